"""Losses on (anchor, neighbour, distant) embeddings.

Each loss takes three [B, D] float arrays and returns (loss, metrics) with the same metric keys: 'loss',
'active_fraction', 'embedding_norm', 'd_pos', 'd_neg'. Metrics are batch means, so averaging them over devices
(`lax.pmean`) gives the global-batch value. `triplet_loss` averages over the triplets whose hinge is positive, a
ratio that a plain pmean of per-device losses would get wrong; under `pmap` pass `axis_name` and it scales its
per-device value so that the pmean of losses (and of gradients) equals the single-device result.

Two families:
- per-triplet ('triplet', 'tile2vec'): each anchor meets its own neighbour and its own distant tile;
- batch-wide ('batch_all', 'batch_hard', 'infonce'): each anchor also meets every other triplet's neighbour and
  every distant tile of the global batch as negatives (Hermans et al. 2017 for the mined triplets, COLA for the
  softmax), so one forward pass teaches B x (2B - 1) comparisons instead of B. Under `pmap` the candidates are
  gathered from all devices (`lax.all_gather`, whose transpose sends each gradient back to the device that owns the
  embedding), so the negatives are those of the global batch and the result equals the single-device one.
  Another triplet's neighbour can come from the anchor's own recording: such false negatives are rare when the
  batch draws from many recordings, and are accepted for simplicity.
"""

import functools
from typing import Callable

import jax
from jax import lax
import jax.numpy as jnp
import optax

Metrics = dict[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, Metrics]]


def _norm(x: jax.Array) -> jax.Array:
  # The floor keeps the gradient finite where two embeddings coincide (d sqrt(s)/ds is infinite at s = 0).
  return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1), 1e-12))


def _embedding_norm(za, zn, zd) -> jax.Array:
  return jnp.mean(jnp.stack([_norm(za), _norm(zn), _norm(zd)]))


def triplet_loss(za: jax.Array, zn: jax.Array, zd: jax.Array, margin: float = 1.0,
                 axis_name: str | None = None) -> tuple[jax.Array, Metrics]:
  """The original system's loss: mean over active triplets of max(0, |a - n|^2 - |a - d|^2 + margin).

  A triplet is active when its hinge is positive; with none active the loss is 0 (not NaN).

  Args:
    za, zn, zd: [B, D] anchor, neighbour and distant embeddings.
    margin: hinge margin.
    axis_name: the pmap axis, if any: the count of active triplets is then taken over all devices.

  Returns:
    (loss, metrics) with metrics 'loss', 'active_fraction', 'embedding_norm', 'd_pos', 'd_neg' (mean squared
    distances).
  """
  d_pos = jnp.sum((za - zn) ** 2, axis=-1)
  d_neg = jnp.sum((za - zd) ** 2, axis=-1)
  hinge = jax.nn.relu(d_pos - d_neg + margin)
  active = (hinge > 0).astype(jnp.float32)
  num_active = jnp.sum(active)
  scale = 1.0
  if axis_name is not None:
    num_active = lax.psum(num_active, axis_name)
    scale = lax.psum(1.0, axis_name)  # pmean of (local sum * num_devices / global count) = global mean
  loss = jnp.sum(hinge) * scale / jnp.maximum(num_active, 1.0)
  metrics = {'loss': loss, 'active_fraction': jnp.mean(active), 'embedding_norm': _embedding_norm(za, zn, zd),
             'd_pos': jnp.mean(d_pos), 'd_neg': jnp.mean(d_neg)}
  return loss, metrics


def tile2vec_loss(za: jax.Array, zn: jax.Array, zd: jax.Array, margin: float = 1.0, l2: float = 0.01,
                  axis_name: str | None = None) -> tuple[jax.Array, Metrics]:
  """Tile2Vec's loss: mean of max(0, |a - n| - |a - d| + margin) + l2 * mean(|a| + |n| + |d|).

  Distances and norms are not squared. With the L2-normalised encoder the l2 term is the constant 3 * l2; it only
  matters for an encoder whose output is not normalised.

  Args:
    za, zn, zd: [B, D] anchor, neighbour and distant embeddings.
    margin: hinge margin.
    l2: weight of the embedding-norm penalty.
    axis_name: unused (every term is a plain mean, which pmean already gets right); accepted so that both losses
      share one signature.

  Returns:
    (loss, metrics) with metrics 'loss', 'active_fraction', 'embedding_norm', 'd_pos', 'd_neg' (mean distances).
  """
  del axis_name
  d_pos = _norm(za - zn)
  d_neg = _norm(za - zd)
  hinge = jax.nn.relu(d_pos - d_neg + margin)
  norms = _norm(za) + _norm(zn) + _norm(zd)
  loss = jnp.mean(hinge) + l2 * jnp.mean(norms)
  metrics = {'loss': loss, 'active_fraction': jnp.mean((hinge > 0).astype(jnp.float32)),
             'embedding_norm': jnp.mean(norms) / 3.0, 'd_pos': jnp.mean(d_pos), 'd_neg': jnp.mean(d_neg)}
  return loss, metrics


def _squared_distances(x: jax.Array, y: jax.Array) -> jax.Array:
  """[N, M] squared Euclidean distances, from dot products (no [N, M, D] intermediate at large batches)."""
  sq = jnp.sum(x * x, axis=-1)[:, None] + jnp.sum(y * y, axis=-1)[None, :] - 2.0 * x @ y.T
  return jnp.maximum(sq, 0.0)  # Rounding can make a zero distance slightly negative.


def _batch_candidates(zn: jax.Array, zd: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
  """Every neighbour, then every distant tile, of the global batch ([2 G B, D]), and each local anchor's positive.

  The positive of local anchor i is its own neighbour: row (device index * B + i) of the candidates.
  """
  local = jnp.arange(zn.shape[0])
  if axis_name is None:
    return jnp.concatenate([zn, zd]), local
  zn_all = lax.all_gather(zn, axis_name, tiled=True)
  zd_all = lax.all_gather(zd, axis_name, tiled=True)
  return jnp.concatenate([zn_all, zd_all]), lax.axis_index(axis_name) * zn.shape[0] + local


def _pair_metrics(za, zn, zd) -> Metrics:
  """The per-triplet squared distances and the embedding norm: the same monitoring figures for every loss."""
  return {'embedding_norm': _embedding_norm(za, zn, zd), 'd_pos': jnp.mean(jnp.sum((za - zn) ** 2, axis=-1)),
          'd_neg': jnp.mean(jnp.sum((za - zd) ** 2, axis=-1))}


def batch_all_triplet_loss(za: jax.Array, zn: jax.Array, zd: jax.Array, margin: float = 1.0,
                           axis_name: str | None = None) -> tuple[jax.Array, Metrics]:
  """Batch-all triplets: every (anchor, negative) pair of the batch, averaged over the active ones.

  For anchor i with neighbour n_i, the negatives are every other neighbour and every distant tile of the (global)
  batch; each pair gives max(0, |a_i - n_i|^2 - |a_i - c|^2 + margin), and the loss is the mean over the pairs
  whose hinge is positive (0 if none is), as `triplet_loss` does for its single negative.

  Returns:
    (loss, metrics); 'active_fraction' is the share of (anchor, negative) pairs with a positive hinge, 'd_pos' and
    'd_neg' the anchors' squared distances to their own neighbour and distant tile.
  """
  candidates, positive = _batch_candidates(zn, zd, axis_name)
  dist = _squared_distances(za, candidates)  # [B, 2GB]
  d_pos = jnp.take_along_axis(dist, positive[:, None], axis=1)
  is_negative = jnp.arange(candidates.shape[0])[None, :] != positive[:, None]
  hinge = jnp.where(is_negative, jax.nn.relu(d_pos - dist + margin), 0.0)
  active = (hinge > 0).astype(jnp.float32)
  num_active = jnp.sum(active)
  scale = 1.0
  if axis_name is not None:
    num_active = lax.psum(num_active, axis_name)
    scale = lax.psum(1.0, axis_name)  # As in triplet_loss: pmean of the scaled local sums is the global mean.
  loss = jnp.sum(hinge) * scale / jnp.maximum(num_active, 1.0)
  active_fraction = jnp.sum(active) / jnp.sum(is_negative.astype(jnp.float32))
  return loss, {'loss': loss, 'active_fraction': active_fraction, **_pair_metrics(za, zn, zd)}


def batch_hard_triplet_loss(za: jax.Array, zn: jax.Array, zd: jax.Array, margin: float = 1.0,
                            axis_name: str | None = None) -> tuple[jax.Array, Metrics]:
  """Batch-hard triplets: each anchor against its closest negative in the batch, mean over anchors.

  max(0, |a_i - n_i|^2 - min_c |a_i - c|^2 + margin) with c over every other neighbour and every distant tile of
  the (global) batch. A plain mean over anchors, so a pmean over devices is already the global mean.

  Returns:
    (loss, metrics); 'active_fraction' is the share of anchors whose hardest negative violates the margin.
  """
  candidates, positive = _batch_candidates(zn, zd, axis_name)
  dist = _squared_distances(za, candidates)
  d_pos = jnp.take_along_axis(dist, positive[:, None], axis=1)[:, 0]
  is_negative = jnp.arange(candidates.shape[0])[None, :] != positive[:, None]
  hardest = jnp.min(jnp.where(is_negative, dist, jnp.inf), axis=1)
  hinge = jax.nn.relu(d_pos - hardest + margin)
  loss = jnp.mean(hinge)
  return loss, {'loss': loss, 'active_fraction': jnp.mean((hinge > 0).astype(jnp.float32)),
                **_pair_metrics(za, zn, zd)}


def infonce_loss(za: jax.Array, zn: jax.Array, zd: jax.Array, temperature: float = 0.1, debias: float = 0.0,
                 axis_name: str | None = None) -> tuple[jax.Array, Metrics]:
  """InfoNCE over the batch (COLA-style): pick each anchor's own neighbour out of all neighbours and distant tiles.

  Logits are cosine similarities / temperature between anchor i and every neighbour and distant tile of the
  (global) batch; the loss is the mean cross-entropy with n_i as the target. Embeddings are normalised here, so the
  temperature means the same for any encoder (the default one is already unit-norm). COLA's bilinear similarity is
  left out: with unit-norm outputs and a trained dense head before them, the dot product has the same reach.

  debias > 0 is the debiased contrastive loss (Chuang et al. 2020): without labels, some of the negatives share the
  anchor's class (another recording of the same instrument), and plain InfoNCE pushes them away as hard as the
  rest. With `debias` the expected share of such negatives (the class prior, e.g. 1/6 for six balanced classes),
  each anchor's sum over its N negatives, N mean(exp(s_neg)), becomes
  N max((mean(exp(s_neg)) - debias exp(s_pos)) / (1 - debias), exp(-1 / temperature)): the positive's part in it
  taken out, floored at the smallest value the sum can take. debias = 0 is plain InfoNCE.

  Returns:
    (loss, metrics); 'active_fraction' is the share of anchors for which some negative is at least as similar as
    their neighbour (the anchors not yet ranked right).
  """
  unit = lambda x: x / _norm(x)[:, None]
  candidates, positive = _batch_candidates(zn, zd, axis_name)
  logits = unit(za) @ unit(candidates).T / temperature
  positive_logit = jnp.take_along_axis(logits, positive[:, None], axis=1)
  is_negative = jnp.arange(candidates.shape[0])[None, :] != positive[:, None]
  if debias:
    # Shifted by each row's largest logit, so that no exponential overflows and the largest is 1.
    top = lax.stop_gradient(jnp.max(logits, axis=1))
    num_negatives = candidates.shape[0] - 1
    exp_positive = jnp.exp(positive_logit[:, 0] - top)
    mean_negative = jnp.sum(jnp.where(is_negative, jnp.exp(logits - top[:, None]), 0.0), axis=1) / num_negatives
    negatives = num_negatives * jnp.maximum((mean_negative - debias * exp_positive) / (1.0 - debias),
                                            jnp.exp(-1.0 / temperature - top))
    loss = jnp.mean(jnp.log(exp_positive + negatives) - (positive_logit[:, 0] - top))
  else:
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, positive))
  misranked = jnp.any(is_negative & (logits >= positive_logit), axis=1)
  return loss, {'loss': loss, 'active_fraction': jnp.mean(misranked.astype(jnp.float32)),
                **_pair_metrics(za, zn, zd)}


LOSSES = {
    'triplet': (triplet_loss, ('margin',)),
    'tile2vec': (tile2vec_loss, ('margin', 'l2')),
    'batch_all': (batch_all_triplet_loss, ('margin',)),
    'batch_hard': (batch_hard_triplet_loss, ('margin',)),
    'infonce': (infonce_loss, ('temperature', 'debias')),
}


def get_loss_fn(name: str, **hyper) -> LossFn:
  """The loss `name` (a key of LOSSES) with its hyper-parameters bound.

  `hyper` may hold settings of any loss (margin, l2, temperature), so one config section serves all; those the
  chosen loss does not take (l2 for 'triplet') are left out. The result is called as
  loss_fn(za, zn, zd, axis_name=None).
  """
  if name not in LOSSES:
    raise ValueError(f'config.loss.name={name!r} is not a loss; choose one of {sorted(LOSSES)}.')
  fn, takes = LOSSES[name]
  known = sorted({k for _, ks in LOSSES.values() for k in ks})
  unknown = sorted(set(hyper) - set(known))
  if unknown:
    raise ValueError(f'unknown loss settings {unknown}; the losses take {known}.')
  if 'temperature' in takes and hyper.get('temperature', 1.0) <= 0:
    raise ValueError(f'config.loss.temperature={hyper["temperature"]} must be positive (e.g. 0.1).')
  if 'debias' in takes and not 0.0 <= hyper.get('debias', 0.0) < 1.0:
    raise ValueError(f'config.loss.debias={hyper["debias"]} must be in [0, 1): the expected share of negatives of '
                     "the anchor's own class (0 turns it off).")
  return functools.partial(fn, **{k: v for k, v in hyper.items() if k in takes})
