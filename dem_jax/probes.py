"""Judging a learnt embedding space with labels: linear probe, k-Means, retrieval, monitoring.

Every function takes numpy arrays (embeddings [N, D], integer labels 0..K-1 in [N]) and returns numpy
arrays or plain dicts of floats, ints, strings and lists, so that notebooks and report.json use them as
they are. Fractions are in [0, 1].
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.spatial.distance import cdist
from sklearn import metrics
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler, normalize

__all__ = [
    'linear_probe',
    'kmeans_scores',
    'retrieval_precision',
    'logmel_stats_embedding',
    'silhouette',
    'centroid_distances',
    'fold_summary',
]


def _as_embeddings(x, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f'{name} must be [N, D] embeddings, got shape {x.shape}; reshape or stack the tiles first.')
  if x.shape[0] == 0:
    raise ValueError(f'{name} is empty: no embeddings to score.')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{name} holds NaN or inf values; check the encoder output before probing.')
  return x


def _as_labels(y, n: int, name: str) -> np.ndarray:
  y = np.asarray(y)
  if y.shape != (n,):
    raise ValueError(f'{name} must be [N] = [{n}] labels, got shape {y.shape}.')
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f'{name} must be integer class indices 0..K-1, got dtype {y.dtype}; map names to indices first.')
  if n and y.min() < 0:
    raise ValueError(f'{name} holds negative labels; unlabelled tiles must be dropped before probing.')
  return y.astype(np.int64)


def _label_names(label_names: Sequence[str] | None, *label_arrays: np.ndarray) -> list[str]:
  top = max(int(y.max()) for y in label_arrays if y.size) + 1
  if label_names is None:
    return [str(i) for i in range(top)]
  names = [str(n) for n in label_names]
  if top > len(names):
    raise ValueError(f'labels go up to {top - 1} but only {len(names)} label_names were given.')
  return names


def linear_probe(
    train_x,
    train_y,
    test_x,
    test_y,
    *,
    test_clip_ids=None,
    label_names: Sequence[str] | None = None,
    C: float = 1.0,
    max_iter: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
  """Logistic regression on frozen, standardised tile embeddings; scored per tile and per clip.

  The scaler is fit on the train tiles only. Per clip, the predicted class probabilities of a clip's tiles
  are averaged and the argmax taken (DCASE 2018 task 5's official unit is the 10-s clip). Without
  `test_clip_ids` every tile is its own clip, so the clip figures equal the tile figures.

  Returns a dict: macro_f1_tile, macro_f1_clip, accuracy (per clip), accuracy_tile, per_class_f1
  {name: f1} (per clip), confusion_matrix [K][K] (rows true, columns predicted, per clip), labels [K],
  num_train, num_test_tiles, num_test_clips. Macro F1 averages over all K classes of the label set.
  """
  train_x = _as_embeddings(train_x, 'train_x')
  test_x = _as_embeddings(test_x, 'test_x')
  if train_x.shape[1] != test_x.shape[1]:
    raise ValueError(f'train_x has {train_x.shape[1]} dims but test_x has {test_x.shape[1]}.')
  train_y = _as_labels(train_y, len(train_x), 'train_y')
  test_y = _as_labels(test_y, len(test_x), 'test_y')
  names = _label_names(label_names, train_y, test_y)
  num_classes = len(names)
  if np.unique(train_y).size < 2:
    raise ValueError('train_y holds a single class; a probe needs at least two classes to train on.')

  scaler = StandardScaler().fit(train_x)
  clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
  clf.fit(scaler.transform(train_x), train_y)
  # A class absent from train gets no column from sklearn; put the columns back at their label index.
  probs = np.zeros((len(test_x), num_classes))
  probs[:, clf.classes_] = clf.predict_proba(scaler.transform(test_x))
  tile_pred = probs.argmax(axis=1)

  if test_clip_ids is None:
    clip_index = np.arange(len(test_x))
    num_clips = len(test_x)
  else:
    clip_ids = np.asarray(test_clip_ids)
    if clip_ids.shape != (len(test_x),):
      raise ValueError(f'test_clip_ids must be [N] = [{len(test_x)}], got shape {clip_ids.shape}.')
    _, clip_index = np.unique(clip_ids, return_inverse=True)
    num_clips = int(clip_index.max()) + 1
  counts = np.bincount(clip_index, minlength=num_clips)
  clip_probs = np.stack(
      [np.bincount(clip_index, weights=probs[:, c], minlength=num_clips) for c in range(num_classes)], axis=1
  ) / counts[:, None]
  clip_y = np.empty(num_clips, dtype=np.int64)
  clip_y[clip_index] = test_y
  if not np.array_equal(clip_y[clip_index], test_y):
    bad = np.unique(clip_index[clip_y[clip_index] != test_y])
    raise ValueError(f'{bad.size} test clips hold tiles with different labels; a clip has one label.')
  clip_pred = clip_probs.argmax(axis=1)

  labels = list(range(num_classes))
  f1_tile = metrics.f1_score(test_y, tile_pred, labels=labels, average='macro', zero_division=0)
  per_class = metrics.f1_score(clip_y, clip_pred, labels=labels, average=None, zero_division=0)
  cm = metrics.confusion_matrix(clip_y, clip_pred, labels=labels)
  return {
      'macro_f1_clip': float(np.mean(per_class)),
      'macro_f1_tile': float(f1_tile),
      'accuracy': float(metrics.accuracy_score(clip_y, clip_pred)),
      'accuracy_tile': float(metrics.accuracy_score(test_y, tile_pred)),
      'per_class_f1': {name: float(f) for name, f in zip(names, per_class)},
      'confusion_matrix': cm.tolist(),
      'labels': names,
      'num_train': int(len(train_x)),
      'num_test_tiles': int(len(test_x)),
      'num_test_clips': int(num_clips),
  }


KMEANS_SPACES = ('standardised', 'cosine')


def kmeans_scores(
    x,
    y,
    *,
    k: int | None = None,
    seed: int = 0,
    label_names: Sequence[str] | None = None,
    n_init: int = 4,
    space: str = 'standardised',
    return_assignments: bool = False,
):
  """k-Means on the embeddings in one of two spaces, compared with the labels.

  space='standardised' (each dim to zero mean, unit variance): the same transform as the probe, and it puts the
  log-Mel stats baseline (dims whose scales differ by orders of magnitude) on an equal footing with the network
  outputs. space='cosine': rows L2-normalised, then k-Means, so points group by direction alone (spherical
  k-Means's assignment rule, with Euclidean means), the geometry the triplet loss trains the embedding in.

  n_init restarts (best inertia kept) steady the scores without the cost of sklearn's 10.
  k defaults to the number of classes (len(label_names), else the number of distinct labels).
  Returns a dict: nmi, ari, purity, k, space, labels [K], composition [k][K] (tile counts, rows clusters, columns
  labels). With return_assignments=True returns (dict, assignments [N] int cluster index) instead.
  """
  x = _as_embeddings(x, 'x')
  y = _as_labels(y, len(x), 'y')
  names = _label_names(label_names, y)
  if k is None:
    k = len(label_names) if label_names is not None else int(np.unique(y).size)
  if not 1 <= k <= len(x):
    raise ValueError(f'k={k} clusters needs 1 <= k <= N={len(x)}.')
  if space == 'standardised':
    z = StandardScaler().fit_transform(x)
  elif space == 'cosine':
    z = normalize(x)
  else:
    raise ValueError(f'space must be one of {KMEANS_SPACES}, got {space!r}.')
  assignments = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(z)
  composition = np.zeros((k, len(names)), dtype=np.int64)
  np.add.at(composition, (assignments, y), 1)
  scores = {
      'nmi': float(metrics.normalized_mutual_info_score(y, assignments)),
      'ari': float(metrics.adjusted_rand_score(y, assignments)),
      'purity': float(composition.max(axis=1).sum() / len(x)),
      'k': int(k),
      'space': space,
      'labels': names,
      'composition': composition.tolist(),
  }
  if return_assignments:
    return scores, assignments.astype(np.int64)
  return scores


def _codes(values, n: int, name: str) -> np.ndarray:
  values = np.asarray(values)
  if values.shape != (n,):
    raise ValueError(f'{name} must be [N] = [{n}], got shape {values.shape}.')
  return np.unique(values, return_inverse=True)[1]


def retrieval_precision(
    x,
    y,
    *,
    k: int = 5,
    clip_ids=None,
    groups=None,
    metric: str = 'cosine',
    block_size: int = 512,
) -> dict[str, Any]:
  """Precision@k of nearest neighbours by label, with the query's own clip and group excluded.

  A query's candidates exclude itself, tiles of the same clip (where clip_ids given) and tiles of the same
  group (where groups given, e.g. the DCASE session, whose 4 nodes record the same moment). Queries left
  with fewer than k candidates are skipped. Returns {precision_at_k, k, num_queries, num_skipped}.

  Hand-written top-k in query blocks because sklearn's NearestNeighbors cannot exclude per-query groups;
  blocks keep memory at block_size x N instead of N x N.
  """
  x = _as_embeddings(x, 'x').astype(np.float32)
  n = len(x)
  y = np.asarray(y)
  if y.shape != (n,):
    raise ValueError(f'y must be [N] = [{n}] labels, got shape {y.shape}.')
  if k < 1:
    raise ValueError(f'k must be >= 1, got {k}.')
  if metric == 'cosine':
    keys = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    offset = np.zeros(n, dtype=np.float32)
  elif metric == 'euclidean':
    # -||q - c||^2 = 2 q.c - ||c||^2 - ||q||^2; the last term is the same for all of a query's candidates.
    keys = x
    offset = -np.sum(x * x, axis=1)
  else:
    raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}.")
  scale = 1.0 if metric == 'cosine' else 2.0
  clip_codes = None if clip_ids is None else _codes(clip_ids, n, 'clip_ids')
  group_codes = None if groups is None else _codes(groups, n, 'groups')

  hits = 0
  num_queries = 0
  for start in range(0, n, block_size):
    stop = min(start + block_size, n)
    rows = np.arange(stop - start)
    scores = scale * (keys[start:stop] @ keys.T) + offset[None, :]
    scores[rows, start + rows] = -np.inf
    if clip_codes is not None:
      scores[clip_codes[start:stop, None] == clip_codes[None, :]] = -np.inf
    if group_codes is not None:
      scores[group_codes[start:stop, None] == group_codes[None, :]] = -np.inf
    # k passes of a vectorised argmax: for the small k of P@k, many times faster than argpartition.
    top = np.empty((stop - start, k), dtype=np.int64)
    enough = np.ones(stop - start, dtype=bool)
    for j in range(k):
      top[:, j] = scores.argmax(axis=1)
      enough &= np.isfinite(scores[rows, top[:, j]])  # -inf picked: fewer than k candidates
      scores[rows, top[:, j]] = -np.inf
    hits += int((y[top[enough]] == y[start:stop][enough, None]).sum())
    num_queries += int(enough.sum())
  if num_queries == 0:
    raise ValueError(f'no query has {k} candidates left after excluding its clip and group; lower k.')
  return {
      'precision_at_k': hits / (num_queries * k),
      'k': int(k),
      'num_queries': num_queries,
      'num_skipped': n - num_queries,
  }


def logmel_stats_embedding(tiles, chunk_size: int = 1024) -> np.ndarray:
  """The no-learning baseline: per-band mean then per-band std over time of each log-Mel tile.

  tiles: [N, T, M] (any array that slices, e.g. a zarr array; read in chunks to bound memory).
  Returns float32 [N, 2M]: columns 0..M-1 the means, M..2M-1 the standard deviations.
  """
  if len(tiles.shape) != 3:
    raise ValueError(f'tiles must be [N, T, M] log-Mel tiles, got shape {tuple(tiles.shape)}.')
  n, _, m = tiles.shape
  out = np.empty((n, 2 * m), dtype=np.float32)
  for start in range(0, n, chunk_size):
    chunk = np.asarray(tiles[start:start + chunk_size], dtype=np.float64)
    out[start:start + len(chunk), :m] = chunk.mean(axis=1)
    out[start:start + len(chunk), m:] = chunk.std(axis=1)
  return out


def silhouette(x, y, seed: int = 0, max_samples: int = 2000, metric: str = 'euclidean') -> float:
  """Silhouette score of labelled embeddings on a random subsample of at most max_samples.

  Subsampled because the score is quadratic in N and runs every epoch. Returns nan when the sample holds
  fewer than 2 labels (or as many labels as points), where the score is undefined.
  """
  x = _as_embeddings(x, 'x')
  y = np.asarray(y)
  if y.shape != (len(x),):
    raise ValueError(f'y must be [N] = [{len(x)}] labels, got shape {y.shape}.')
  if len(x) > max_samples:
    keep = np.random.default_rng(seed).choice(len(x), size=max_samples, replace=False)
    x, y = x[keep], y[keep]
  num_labels = np.unique(y).size
  if num_labels < 2 or num_labels >= len(y):
    return float('nan')
  return float(metrics.silhouette_score(x, y, metric=metric))


def centroid_distances(x, y, num_classes: int) -> np.ndarray:
  """Euclidean distances between label centroids, [K, K]; rows and columns of absent labels are nan."""
  x = _as_embeddings(x, 'x')
  y = _as_labels(y, len(x), 'y')
  if y.size and y.max() >= num_classes:
    raise ValueError(f'labels go up to {y.max()} but num_classes={num_classes}.')
  counts = np.bincount(y, minlength=num_classes).astype(np.float64)
  sums = np.zeros((num_classes, x.shape[1]))
  np.add.at(sums, y, x)
  with np.errstate(invalid='ignore', divide='ignore'):
    centroids = sums / counts[:, None]
  return cdist(centroids, centroids)


def _is_number(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _numeric_array(v) -> np.ndarray | None:
  if not isinstance(v, (list, tuple, np.ndarray)) or len(v) == 0:
    return None
  try:
    a = np.asarray(v)
  except ValueError:
    return None
  return a if a.dtype.kind in 'iuf' else None


def _summarise(values: list, path: str) -> dict[str, Any]:
  """Summary entries for one key across folds: {'': value} and, for varying numbers, {'_std': std}."""
  first = values[0]
  if all(isinstance(v, dict) for v in values):
    return {'': _merge(values, path)}
  if all(_is_number(v) for v in values):
    if all(isinstance(v, (int, np.integer)) for v in values) and len(set(int(v) for v in values)) == 1:
      return {'': int(first)}  # e.g. k, the same in every fold: keep it an int
    arr = np.asarray(values, dtype=np.float64)
    return {'': float(arr.mean()), '_std': float(arr.std())}
  arrays = [_numeric_array(v) for v in values]
  if all(a is not None for a in arrays) and len({a.shape for a in arrays}) == 1:
    return {'': np.mean(arrays, axis=0).tolist()}  # e.g. confusion matrices: elementwise mean
  if all(v == first for v in values):
    return {'': first}  # e.g. label names
  return {}  # differs across folds and has no mean: only the per-fold entries keep it


def _merge(dicts: list[dict], path: str) -> dict[str, Any]:
  keys = list(dicts[0])
  for i, d in enumerate(dicts[1:], start=2):
    if set(d) != set(keys):
      raise ValueError(f"fold {i} has keys {sorted(d)} at '{path}' but fold 1 has {sorted(keys)}.")
  out: dict[str, Any] = {}
  for key in keys:
    for suffix, value in _summarise([d[key] for d in dicts], f'{path}/{key}').items():
      out[f'{key}{suffix}'] = value
  return out


def fold_summary(per_fold: list[dict]) -> dict[str, Any]:
  """Mean and std across folds of every numeric leaf, in the per-fold dicts' own nested shape.

  Each numeric leaf `name` becomes its mean, with the population std (ddof=0) beside it as `name_std`;
  integers equal in every fold (e.g. k) stay as they are, without a std. Equal-shaped numeric lists (e.g.
  confusion matrices) become their elementwise mean; other values are kept when the same in every fold.
  The per-fold dicts are listed under 'folds', and their count under 'num_folds'.
  Example: [{'a': {'f1': 0.5}}, {'a': {'f1': 0.7}}] -> {'a': {'f1': 0.6, 'f1_std': 0.1}, 'folds': [...],
  'num_folds': 2}.
  """
  if not per_fold:
    raise ValueError('fold_summary needs at least one fold.')
  summary = _merge(list(per_fold), '')
  summary['folds'] = list(per_fold)
  summary['num_folds'] = len(per_fold)
  return summary
