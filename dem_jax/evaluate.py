r"""Judge a learnt embedding space: linear probe, k-Means, retrieval, beside two no-learning baselines.

    dem-jax evaluate --workdir=/scratch/dcase_run [--features_dir=F] [--output_dir=O] [--step=N]
    dem-jax evaluate --workdir=W1,W2,W3,W4 --output_dir=O      # DCASE: one workdir per fold, per-fold embeddings

(`./launch.sh evaluate` in a checkout is the same command.)

Writes O/report.json, O/report.md and PNG plots (default O: WORKDIR/eval_<step>, or the fold-1 workdir's
eval_per_fold_<step> with several); the same figures go into the workdir's TensorBoard as images at the checkpoint's
step, beside an embedding-projector export of the labelled held-out tiles. Progress (embedding, each probe, k-Means,
t-SNE) shows as a bar on a terminal and as a log line every 30 s otherwise. The features must come from the front end
the model was trained with. The protocol follows the data:
- DCASE 2018 task 5 development set: the 4 folds (probe trained on the fold's train part, scored on its evaluate
  clips), reported as the fold mean and standard deviation with each fold listed. macro_f1_clip is the official
  per-10-s-clip metric (the mean of a clip's tile probabilities); macro_f1_tile is per 5-s tile.
  With one workdir, its embedding serves all four folds, so the evaluate clips of the folds it was not trained
  for were in its (unlabelled) training audio. With four workdirs, one trained with --config.data.fold=k for each
  k (model.json's 'fold'), fold k's probe, k-Means and retrieval use the embedding that never heard fold k's
  evaluate clips: the honest protocol. report['settings']['protocol_name'] says which was used.
- Folder data: the recorded train/test split.
Two representations of the model are judged: its L2-normalised embedding (report['model']) and the pooled trunk
features before the head (report['model_trunk']), both from the same pass over the tiles. k-Means runs on
standardised features (FIG['kmeans']) and on the unit sphere (FIG['kmeans_cosine']); with one embedding it and
retrieval run on the labelled tiles of all test parts together, with per-fold embeddings on each fold's test tiles,
then averaged. Retrieval excludes the query's own clip and group (session, song). Baselines, on the same tiles and
split: per-band mean and std of the log-Mel tile, and the same network with random weights (per fold, the
architecture and input normaliser of that fold's workdir).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from dem_jax import log_util
from dem_jax import probes
from dem_jax import report_markdown
from dem_jax.embed import Embedder, TileEmbedder, check_frontend, embed_clips, prepare_output_dir
from dem_jax.features import Features, open_features
from dem_jax.metric_writer import MetricWriter

MODEL = 'model'
MODEL_TRUNK = 'model_trunk'
REPRESENTATIONS = (MODEL, MODEL_TRUNK)
BASELINES = ('logmel_stats', 'random_init')
PROJECTOR_MAX_TILES = 5000  # The projector stays responsive with a few thousand points.

# What each FIG of the report measures, written into the report beside the figures.
DESCRIPTIONS = {
    MODEL: 'the model\'s output: the L2-normalised embedding the triplet loss trains',
    MODEL_TRUNK: 'the trunk\'s last block averaged over time and bands, before dropout and the head: the head\'s input',
    'logmel_stats': 'no learning: per-band mean and standard deviation of the log-Mel tile',
    'random_init': 'the same network with random weights (and the trained input normaliser)',
}

PROTOCOL_SPLIT = 'recorded split: one embedding, trained without the test part'
PROTOCOL_ONE_EMBEDDING = 'one embedding for all folds: folds other than the training fold were heard unlabelled'
PROTOCOL_ALL_FOLDS_HEARD = ('one embedding for all folds: trained on every fold, all evaluate clips were heard '
                            'unlabelled')
PROTOCOL_PER_FOLD = ('per-fold embeddings: fold k is scored on the embedding trained with data.fold=k, which never '
                     'heard its evaluate clips')


def random_init_embedder(embedder: Embedder, seed: int = 0, *, variables: dict | None = None) -> TileEmbedder:
  """The trained model's architecture with freshly initialised weights (same normaliser).

  `variables`: weights already drawn for this architecture and seed (the folds of a per-fold evaluation share them:
  initialising a ResNet takes longer than embedding a small store).
  """
  if variables is None:
    variables = random_init_variables(embedder, seed)
  return TileEmbedder(embedder.model, variables, batch_size=embedder.embed_tiles.batch_size)


def random_init_variables(embedder: Embedder, seed: int = 0) -> dict:
  dummy = np.zeros((1, embedder.tile_frames, embedder.frontend.n_mels), np.float32)
  return dict(embedder.model.init(jax.random.key(seed), dummy, train=False))


def probe_splits(features: Features) -> list[tuple[str, list[str], list[str]]]:
  """(name, train splits, test splits) of each evaluation: the 4 DCASE folds, or the recorded split."""
  folds = features.folds()
  if folds:
    return [(f'fold{k}', features.train_splits(k), features.test_splits(k)) for k in folds]
  train, test = features.train_splits(), features.test_splits()
  if not test or test == train:
    raise ValueError(f'{features.root} has no test part to score a probe on (splits: '
                     f'{sorted({c.split for c in features.clips})}); preprocess folder data with a test fraction or '
                     'a split file, or evaluate on a DCASE development set.')
  return [('split', train, test)]


def embedders_per_fold(embedders: list[Embedder], features: Features) -> dict[str, Embedder]:
  """{'fold<k>': the embedder trained with data.fold=k} for every fold of `features`, in fold order.

  Raises ValueError with the fix when the workdirs do not give exactly one embedding per fold, or when they cut
  different tiles (a tile's figures must mean the same thing in every fold).
  """
  folds = features.folds()
  workdirs = ','.join(e.workdir for e in embedders)
  if not folds:
    raise ValueError(f'several workdirs are for the DCASE 4-fold protocol, but {features.root} has no folds; '
                     f'evaluate one workdir at a time on it (--workdir={embedders[0].workdir}).')
  train_loop = ('train one workdir per fold (for k in ' + ' '.join(map(str, folds)) + ': dem-jax train '
                '--config=configs/dcase.py --config.data.fold=$k --workdir=run_fold$k) and pass them all')
  by_fold = {}
  for embedder in embedders:
    fold = embedder.info.get('fold')
    if not fold:
      raise ValueError(f'{embedder.workdir}/model.json names no training fold (fold={fold!r}: trained on every '
                       f'fold or on folder data), so no fold is held out of it; {train_loop}.')
    if fold not in folds:
      raise ValueError(f'{embedder.workdir} was trained with data.fold={fold}, but {features.root} has folds {folds}.')
    if fold in by_fold:
      raise ValueError(f'{by_fold[fold].workdir} and {embedder.workdir} were both trained with data.fold={fold}; '
                       'give one workdir per fold.')
    by_fold[fold] = embedder
  missing = [k for k in folds if k not in by_fold]
  if missing:
    raise ValueError(f'no workdir trained with data.fold={",".join(map(str, missing))} among --workdir={workdirs}; '
                     f'{train_loop}.')
  first = by_fold[folds[0]]
  for fold in folds[1:]:
    other = by_fold[fold]
    for setting in ('tile_frames', 'hop_frames', 'frontend'):
      if getattr(other, setting) != getattr(first, setting):
        raise ValueError(f'{first.workdir} and {other.workdir} differ in {setting} ({getattr(first, setting)} vs '
                         f'{getattr(other, setting)}); train every fold with the same config but data.fold.')
    # The folds' scores are put side by side: each embedding must have been trained on the same store.
    for key in ('features_digest', 'features_dir'):
      if first.info.get(key) and other.info.get(key) and first.info[key] != other.info[key]:
        raise ValueError(f'{first.workdir} and {other.workdir} were trained on different feature stores '
                         f'({key}: {first.info[key]} vs {other.info[key]}); train every fold on the same features.')
  return {f'fold{k}': by_fold[k] for k in folds}


def check_finite(xs: dict, clip_ids: np.ndarray, features_root: str) -> None:
  """Refuses non-finite tile vectors naming the representation, the first clip and the store, before any probe."""
  for name, x in xs.items():
    for fold, tiles in (x.items() if isinstance(x, dict) else [(None, x)]):
      bad = np.flatnonzero(~np.all(np.isfinite(tiles), axis=1))
      if not bad.size:
        continue
      if name in REPRESENTATIONS:
        cause = f"{f'the {fold} workdir' if fold else 'the workdir'}'s checkpoint or the store's frames are not finite"
      else:
        cause = "the store's frames are not finite"
      raise ValueError(f'{name} is not finite for {bad.size} tile(s), first of clip {clip_ids[bad[0]]} in '
                       f'{features_root}: {cause}; preprocess the data again into a new folder, or evaluate '
                       'another checkpoint (--step).')


def clusters_and_neighbours(x: np.ndarray, labels: np.ndarray, clip_ids: np.ndarray, groups: np.ndarray,
                            label_names: list[str], *, retrieval_k: int, seed: int) -> dict:
  """k-Means in both spaces (standardised, unit sphere) and retrieval of one set of labelled tiles."""
  return {
      'kmeans': probes.kmeans_scores(x, labels, seed=seed, label_names=label_names, space='standardised'),
      'kmeans_cosine': probes.kmeans_scores(x, labels, seed=seed, label_names=label_names, space='cosine'),
      'retrieval': probes.retrieval_precision(x, labels, k=retrieval_k, clip_ids=clip_ids, groups=groups),
  }


def figures(x, labels: np.ndarray, clip_ids: np.ndarray, groups: np.ndarray, splits: np.ndarray, protocol,
            label_names: list[str], *, retrieval_k: int, seed: int, on_progress=None) -> dict:
  """Every figure of one representation (a FIG of report.json).

  `x`: [N, D], one embedding for every fold: each fold's probe, then k-Means and retrieval once over the test tiles
  of all folds. Or {fold name: [N, D]}, one embedding per fold: fold k's probe, k-Means and retrieval each on its own
  embedding, k-Means and retrieval on fold k's test tiles, all three then summarised over the folds.
  `on_progress(note)` follows each probe and k-Means.
  """
  on_progress = on_progress or (lambda note: None)
  per_fold_x = isinstance(x, dict)
  per_fold = []
  for fold_name, train_splits, test_splits in protocol:
    fold_x = x[fold_name] if per_fold_x else x
    train, test = np.isin(splits, train_splits), np.isin(splits, test_splits)
    fig = {'linear_probe': probes.linear_probe(fold_x[train], labels[train], fold_x[test], labels[test],
                                               test_clip_ids=clip_ids[test], label_names=label_names, seed=seed)}
    on_progress(f'linear probe, {fold_name}')
    if per_fold_x:
      fig |= clusters_and_neighbours(fold_x[test], labels[test], clip_ids[test], groups[test], label_names,
                                     retrieval_k=retrieval_k, seed=seed)
      on_progress(f'k-Means, {fold_name}')
    per_fold.append(fig)
  if len(per_fold) > 1:
    fig = probes.fold_summary(per_fold)
    probe = fig['linear_probe']
    # Per-class F1 holds class names only; their spread across folds goes beside it.
    per_class = probe['per_class_f1']
    probe['per_class_f1'] = {k: v for k, v in per_class.items() if k in label_names}
    probe['per_class_f1_std'] = {k: per_class[f'{k}_std'] for k in label_names if f'{k}_std' in per_class}
    for name in ('kmeans', 'kmeans_cosine'):
      # Cluster numbers mean nothing across folds: each fold's composition stays in its own entry only.
      fig.get(name, {}).pop('composition', None)
    fig['folds'] = [{'fold': name} | p for (name, _, _), p in zip(protocol, fig['folds'])]
  else:
    fig = per_fold[0]
  if not per_fold_x:
    tested = np.isin(splits, [s for _, _, test in protocol for s in test])
    fig |= clusters_and_neighbours(x[tested], labels[tested], clip_ids[tested], groups[tested], label_names,
                                   retrieval_k=retrieval_k, seed=seed)
    on_progress('k-Means')
  return fig


def protocol_name(features: Features, per_fold: bool, training_fold: int | None) -> str:
  """What the embedding(s) heard of the tiles they are scored on (report['settings']['protocol_name'])."""
  if per_fold:
    return PROTOCOL_PER_FOLD
  if not features.folds():
    return PROTOCOL_SPLIT
  return PROTOCOL_ONE_EMBEDDING if training_fold else PROTOCOL_ALL_FOLDS_HEARD


def training_loss(workdirs: list[str]) -> str | None:
  """The loss (config.loss.name) the workdirs were trained with, from their config.json; None if unknown."""
  names = set()
  for workdir in workdirs:
    try:
      with open(os.path.join(workdir, 'config.json')) as f:
        names.add(json.load(f)['loss']['name'])
    except (OSError, ValueError, KeyError, TypeError):
      return None
  return ', '.join(sorted(names)) or None


def model_tile_fn(embedder: Embedder):
  """The model's two representations of a batch of tiles, from one forward pass."""
  def embed(tiles):
    out = embedder.embed_tiles(tiles, trunk=True)
    return {MODEL: out['embedding'], MODEL_TRUNK: out['trunk']}
  return embed


def embed_per_fold(features: Features, clips: list, fold_embedders: dict, *, seed: int, on_progress=None) -> dict:
  """{fold name: `embed_clips` table} with the model's two representations and the random-init baseline of each
  fold's embedder (one pass over the tiles per embedder), and the log-Mel stats in the first fold's table only."""
  tables, random_weights = {}, {}
  for fold_name, embedder in fold_embedders.items():
    architecture = json.dumps(embedder.info['model'], sort_keys=True)
    if architecture not in random_weights:
      random_weights[architecture] = random_init_variables(embedder, seed)
    tile_fns = {MODEL: model_tile_fn(embedder),
                'random_init': random_init_embedder(embedder, seed, variables=random_weights[architecture])}
    if not tables:
      tile_fns['logmel_stats'] = probes.logmel_stats_embedding
    tables[fold_name] = embed_clips(features, clips, tile_fns, tile_frames=embedder.tile_frames,
                                    hop_frames=embedder.hop_frames, on_progress=on_progress)
  return tables


def evaluate(workdirs: str | list[str], *, features_dir: str | None = None, output_dir: str | None = None,
             step: int | None = None, retrieval_k: int = 5, seed: int = 0, plot: bool = True,
             tensorboard: bool = True) -> dict:
  """Embeds, probes, clusters and retrieves for the model and the baselines; writes the report; returns it.

  `workdirs`: one workdir, or (DCASE development set) one per fold, each trained with data.fold=k; see the module
  docstring for the protocol each gives. `step` picks a checkpoint of a single workdir (default: the latest).
  With `plot`, the figures go to PNGs beside the report and, with `tensorboard`, into each WORKDIR/tensorboard at
  the checkpoint's step (with a projector export of the labelled held-out tiles that workdir embedded).
  """
  workdirs = [workdirs] if isinstance(workdirs, str) else list(workdirs)
  if not workdirs:
    raise ValueError('Name the training workdir to evaluate with --workdir (one per fold for per-fold embeddings).')
  if len(workdirs) > 1 and step is not None:
    raise ValueError(f'--step={step} names one checkpoint, but {len(workdirs)} workdirs were given; drop --step '
                     '(each workdir is evaluated at its latest checkpoint) or evaluate one workdir.')
  if plot:
    try:
      from dem_jax import plots
    except ImportError as e:
      raise ValueError(f'the figures need matplotlib ({e}); pip install dem_jax[plots], or evaluate with '
                       '--noplot.') from None
  embedders = [Embedder(w, step=step) for w in workdirs]
  features_dir = features_dir or embedders[0].info.get('features_dir')
  if not features_dir:
    raise ValueError('Name the features to evaluate on with --features_dir.')
  features = open_features(features_dir)
  for embedder in embedders:
    check_frontend(features, embedder)
  protocol = probe_splits(features)
  per_fold = len(embedders) > 1
  # {fold name: embedder} with per-fold embeddings; {None: embedder} with one for all folds.
  fold_embedders = embedders_per_fold(embedders, features) if per_fold else {None: embedders[0]}
  first = next(iter(fold_embedders.values()))
  default_output = f'eval_per_fold_{first.step}' if per_fold else f'eval_{first.step}'
  output_dir = output_dir or os.path.join(first.workdir, default_output)
  prepare_output_dir(output_dir)

  used = {s for _, train, test in protocol for s in train + test}
  clips = [c for c in features.clips if c.label and c.split in used]
  if not clips:
    raise ValueError(f'{features.root} has no labelled clips in the splits {sorted(used)}; nothing to evaluate.')
  progress = log_util.Progress('evaluate: embedding', len(clips) * len(fold_embedders), unit='clip')
  tables = embed_per_fold(features, clips, fold_embedders, seed=seed, on_progress=progress.update)
  progress.close()
  table = next(iter(tables.values()))
  index = table['clip_index']
  labels = np.array([features.label_index(c.label) for c in clips])[index]
  clip_ids = np.array([c.clip_id for c in clips])[index]
  groups = np.array([c.group for c in clips])[index]
  splits = np.array([c.split for c in clips])[index]
  if per_fold:
    # The log-Mel stats need no model: computed in the first pass, the same for every fold.
    xs = {name: {fold: tables[fold].get(name, table[name]) for fold in tables} for name in REPRESENTATIONS + BASELINES}
  else:
    xs = {name: table[name] for name in REPRESENTATIONS + BASELINES}

  names = REPRESENTATIONS + BASELINES
  check_finite(xs, clip_ids, features.root)
  progress = log_util.Progress('evaluate: probes and clusters',
                               len(names) * len(protocol) * (2 if per_fold else 1) + len(names) * (not per_fold)
                               + int(plot), unit='step')
  results = {name: figures(xs[name], labels, clip_ids, groups, splits, protocol, features.labels,
                           retrieval_k=retrieval_k, seed=seed,
                           on_progress=lambda note, name=name: progress.update(note=f'{name}: {note}'))
             for name in names}
  settings = {
      'protocol_name': protocol_name(features, per_fold, first.info.get('fold')),
      'features_dir': features.root,
      'dataset': features.dataset,
      'protocol': [{'name': n, 'train': tr, 'test': te} for n, tr, te in protocol],
      'tile_seconds': first.info.get('tile_seconds'),
      'tile_frames': first.tile_frames,
      'hop_seconds': first.hop_seconds,
      'num_clips': len(clips),
      'num_tiles': int(len(index)),
      'retrieval_k': retrieval_k,
      'seed': seed,
      'training_loss': training_loss([e.workdir for e in fold_embedders.values()]),
  }
  if per_fold:
    settings['workdirs'] = {fold: e.workdir for fold, e in fold_embedders.items()}
    checkpoint_step = {fold: int(e.step) for fold, e in fold_embedders.items()}
  else:
    settings |= {'workdir': first.workdir, 'training_fold': first.info.get('fold')}
    checkpoint_step = int(first.step)
  report = {
      MODEL: results[MODEL],
      MODEL_TRUNK: results[MODEL_TRUNK],
      'baselines': {name: results[name] for name in BASELINES},
      'representations': dict(DESCRIPTIONS),
      'checkpoint_step': checkpoint_step,
      'settings': settings,
  }
  # The tiles each embedding is judged on: its fold's test part, or the test parts of all folds.
  test_parts = {name: test for name, _, test in protocol}
  every_test_part = [s for test in test_parts.values() for s in test]
  held_out = {fold: np.isin(splits, test_parts[fold] if per_fold else every_test_part) for fold in fold_embedders}
  plot_paths = {}
  if plot:
    # With per-fold embeddings, the map and the clusters drawn are the first fold's, in its own embedding.
    fold_name = next(iter(tables))
    shown = held_out[fold_name]
    shown_x = table[MODEL][shown]
    kmeans = report[MODEL]['folds'][0]['kmeans'] if per_fold else report[MODEL]['kmeans']
    where = f', {fold_name}\'s test tiles' if per_fold else ''
    plot_paths = {name: os.path.join(output_dir, f'{name}.png')
                  for name in ('embedding_map', 'confusion_matrix', 'cluster_composition')}
    cm = np.asarray(report[MODEL]['linear_probe']['confusion_matrix'])
    figures_by_name = {
        'embedding_map': plots.plot_embedding_map(
            shown_x, labels[shown], features.labels, plot_paths['embedding_map'], representation='model embedding',
            title=f'Embedding space, step {first.step}{where}', seed=seed),
        'confusion_matrix': plots.plot_confusion_matrix(
            cm, features.labels, plot_paths['confusion_matrix'],
            title='Linear probe on the model embedding, per clip'
            + (' (mean over folds)' if len(protocol) > 1 else '')),
        'cluster_composition': plots.plot_cluster_composition(
            kmeans['composition'], features.labels, plot_paths['cluster_composition'],
            representation='model embedding', space=kmeans['space'], title=fold_name if per_fold else None),
    }
    progress.update(note='t-SNE map and figures')
    if tensorboard:
      # Each workdir gets the figures and a projector export of the tiles it was judged on, in its embedding.
      for fold_name, embedder in fold_embedders.items():
        tiles = held_out[fold_name]
        write_tensorboard(embedder.workdir, embedder.step, figures_by_name, tables[fold_name][MODEL][tiles],
                          [features.labels[i] for i in labels[tiles]], seed=seed)
  progress.close()
  report['plots'] = {k: os.path.basename(v) for k, v in plot_paths.items()}
  with open(os.path.join(output_dir, 'report.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(output_dir, 'report.md'), 'w', encoding='utf-8') as f:
    f.write(report_markdown.render_report_markdown(report, plot_paths, relative_to=output_dir))
  report['output_dir'] = os.path.abspath(output_dir)
  return report


def write_tensorboard(workdir: str, step: int, figures_by_name: dict, embeddings: np.ndarray, labels: list[str], *,
                      seed: int) -> None:
  """The figures as images and the held-out tiles as a projector export, in WORKDIR/tensorboard at `step`.

  metrics.jsonl is left alone: a training may be appending to it.
  """
  writer = MetricWriter(workdir, jsonl=False)
  writer.write_figures(step, {f'eval/{name}': figure for name, figure in figures_by_name.items()})
  keep = np.arange(len(embeddings))
  if len(keep) > PROJECTOR_MAX_TILES:
    keep = np.sort(np.random.default_rng(seed).choice(len(keep), PROJECTOR_MAX_TILES, replace=False))
  writer.write_embedding(step, embeddings[keep], [labels[i] for i in keep], tag='eval/held_out_tiles')
  writer.close()
