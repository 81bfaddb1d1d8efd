"""Triplet losses on (anchor, neighbour, distant) embeddings.

Each loss takes three [B, D] float arrays and returns (loss, metrics). Metrics are batch means, so averaging them
over devices (`lax.pmean`) gives the global-batch value. `triplet_loss` averages over the triplets whose hinge is
positive, a ratio that a plain pmean of per-device losses would get wrong; under `pmap` pass `axis_name` and it
scales its per-device value so that the pmean of losses (and of gradients) equals the single-device result.
"""

import functools
from typing import Callable

import jax
from jax import lax
import jax.numpy as jnp

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


LOSSES = {'triplet': (triplet_loss, ('margin',)), 'tile2vec': (tile2vec_loss, ('margin', 'l2'))}


def get_loss_fn(name: str, **hyper) -> LossFn:
  """The loss `name` ('triplet' | 'tile2vec') with its hyper-parameters bound.

  `hyper` may hold settings of either loss (margin, l2), so one config section serves both; those the chosen loss
  does not take (l2 for 'triplet') are left out. The result is called as loss_fn(za, zn, zd, axis_name=None).
  """
  if name not in LOSSES:
    raise ValueError(f'config.loss.name={name!r} is not a loss; choose one of {sorted(LOSSES)}.')
  fn, takes = LOSSES[name]
  known = sorted({k for _, ks in LOSSES.values() for k in ks})
  unknown = sorted(set(hyper) - set(known))
  if unknown:
    raise ValueError(f'unknown loss settings {unknown}; the losses take {known}.')
  return functools.partial(fn, **{k: v for k, v in hyper.items() if k in takes})
