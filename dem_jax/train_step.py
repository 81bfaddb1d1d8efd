"""The train state, the optimiser and its learning-rate schedules, and the pure triplet step.

`make_train_step` returns one pure function `train_step(state, batch, rng, lr) -> (state, metrics)`; the learning
rate comes from the host (`learning_rate_at`, numpy), so a schedule may depend on things only the host knows, such
as a time budget. `dem_jax.parallel.DataParallel` compiles the step (or a loop of several steps) with `jax.pmap` or
with `jax.jit` over a device mesh.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

ROLES = ('anchor', 'neighbour', 'distant')
SCHEDULES = ('staircase', 'cosine')


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def learning_rate_at(optimizer_config, step, total_steps: int | None = None) -> np.ndarray:
  """The learning rate of step(s) `step` (int or numpy array), float32, computed on the host.

  'staircase' (the original's): learning_rate * decay_rate ** floor(step / decay_steps).
  'cosine': a linear warm-up over warmup_steps, then a half cosine from learning_rate down to
  learning_rate * final_fraction at `total_steps` (or optimizer_config.schedule_steps when set), flat after it.
  """
  step = np.asarray(step, dtype=np.float64)
  base = optimizer_config.learning_rate
  schedule = optimizer_config.get('schedule', 'staircase')
  if schedule == 'staircase':
    lr = base * optimizer_config.decay_rate ** np.floor(step / optimizer_config.decay_steps)
  elif schedule == 'cosine':
    total = optimizer_config.get('schedule_steps', 0) or total_steps
    if not total:
      raise ValueError("config.optimizer.schedule='cosine' needs the run's length: set config.num_steps, "
                       'config.optimizer.schedule_steps or config.train_minutes.')
    warmup = max(int(optimizer_config.get('warmup_steps', 0)), 0)
    final = optimizer_config.get('final_fraction', 0.0)
    ramp = np.minimum(1.0, (step + 1) / warmup) if warmup else 1.0
    progress = np.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    lr = base * ramp * (final + (1 - final) * 0.5 * (1 + np.cos(math.pi * progress)))
  else:
    raise ValueError(f'config.optimizer.schedule={schedule!r}; choose one of {SCHEDULES}.')
  return np.asarray(lr, dtype=np.float32)


def all_finite(tree) -> jax.Array:
  """A device scalar: whether every floating-point leaf of `tree` is free of NaN and inf (one fused reduction,
  so that a step can check the whole state it produced at the cost of reading it once)."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.array(True)


def _kernel_mask(params):
  """True on conv and dense kernels: the original put weight decay on every kernel, not on biases or BatchNorm."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == 'kernel', params)


def make_optimizer(optimizer_config) -> optax.GradientTransformation:
  """Adam's update direction with an L2 penalty on kernels and optional gradient-norm clipping; the step scales it
  by the learning rate of `learning_rate_at`.

  Reads weight_decay and grad_clip_norm (0 turns either off). The penalty's gradient, weight_decay * w, is added
  before Adam (coupled, as a `kernel_regularizer` term in the loss would be, which is what the original did) rather
  than put into the loss, so the logged loss stays the triplet loss; decay added after Adam would be AdamW, a
  different method. Clipping acts on the loss gradient alone.
  """
  parts = []
  if optimizer_config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(optimizer_config.grad_clip_norm))
  if optimizer_config.weight_decay:
    parts.append(optax.add_decayed_weights(optimizer_config.weight_decay, mask=_kernel_mask))
  parts += [optax.scale_by_adam(), optax.scale(-1.0)]
  return optax.chain(*parts)


def create_train_state(rng, model: nn.Module, optimizer: optax.GradientTransformation,
                       tile_shape: tuple[int, int]) -> TrainState:
  """Initial state for tiles of `tile_shape` (frames, mel bands); not yet placed for a parallel step.

  The parameters are drawn with JAX's 'rbg' generator seeded from `rng`: XLA:CPU compiles every threefry call
  site slowly, and ResNet18 has many randomly initialised arrays; RBG's compile far faster (docs/benchmarks.md).
  """
  init_rng = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl='rbg')
  tiles = jnp.zeros((1,) + tuple(tile_shape), jnp.float32)
  variables = jax.jit(lambda init_rng: model.init(init_rng, tiles, train=False))(init_rng)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get('batch_stats', {}),
                    opt_state=optimizer.init(params))


def _forward(model, params, batch_stats, batch, *, train: bool, rng=None):
  """All three roles in one forward pass (one BatchNorm batch, one set of weights), split afterwards.

  The roles are interleaved triplet by triplet ([B, 3, ...] -> [3B, ...]) rather than concatenated: with the batch
  sharded along B, every device then holds whole triplets and the merge and split need no communication.
  """
  tiles = jnp.stack([batch[r] for r in ROLES], axis=1)
  tiles = tiles.reshape((-1,) + tiles.shape[2:])
  variables = {'params': params, 'batch_stats': batch_stats}
  if train:
    z, updates = model.apply(variables, tiles, train=True, rngs={'dropout': rng}, mutable=['batch_stats'])
    batch_stats = updates['batch_stats']
  else:
    z = model.apply(variables, tiles, train=False)
  z = z.reshape((-1, len(ROLES)) + z.shape[1:])
  return (z[:, 0], z[:, 1], z[:, 2]), batch_stats


def _with_axis_name(model: nn.Module, axis_name: str | None) -> nn.Module:
  """The model with its BatchNorm averaging over `axis_name` (None: local batch), for models that have the field."""
  if hasattr(model, 'axis_name') and model.axis_name != axis_name:
    return model.clone(axis_name=axis_name)
  return model


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, loss_fn: Callable,
                    axis_name: str | None = None, *, guard: bool = True, augment: Callable | None = None):
  """`train_step(state, batch, rng, lr) -> (state, metrics)`; batch holds [B, T, M] tiles per role (any float).

  The optimizer's update is multiplied by `lr` (a scalar: `make_optimizer`'s updates are a direction). The dropout
  key is fold_in(rng, step), so a resumed run draws the same masks. With `axis_name` (pmap), gradients and metrics
  are averaged over it and the model's BatchNorm is set to average its batch statistics over it too (the step owns
  that setting, so the model's own axis_name does not matter). metrics['finite'] is 1 when the loss, the gradient
  and the state the update produced are finite (a finite gradient times a learning rate that is not, or an update
  that overflows, gives a non-finite state from finite inputs); metrics['state_finite'] is the last of the three.
  With `guard`, a step that is not finite returns the state unchanged, with the non-finite values in its metrics,
  so the caller can stop with the last good state in hand; without it the caller guards.
  `augment(batch, rng) -> batch` (dem_jax.augment), when given, changes the tiles first, with a key drawn like the
  dropout key's.
  """
  model = _with_axis_name(model, axis_name)

  def train_step(state: TrainState, batch: dict, rng, lr) -> tuple[TrainState, dict]:
    dropout_rng = jax.random.fold_in(rng, state.step)
    if axis_name is not None:  # Different masks on every device, as one big batch would have.
      dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))

    tiles = batch if augment is None else augment(batch, jax.random.fold_in(dropout_rng, 1))

    def objective(params):
      (za, zn, zd), batch_stats = _forward(model, params, state.batch_stats, tiles, train=True, rng=dropout_rng)
      loss, metrics = loss_fn(za, zn, zd, axis_name=axis_name)
      return loss, (metrics, batch_stats)

    (_, (metrics, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
      metrics = jax.lax.pmean(metrics, axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    state_finite = all_finite(new_state)
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm']) & state_finite
    metrics['finite'] = finite.astype(jnp.float32)
    metrics['state_finite'] = state_finite.astype(jnp.float32)
    if guard:
      new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return new_state, metrics

  train_step.axis_name = axis_name
  return train_step


def make_eval_step(model: nn.Module, loss_fn: Callable, axis_name: str | None = None):
  """`eval_step(state, batch) -> metrics`: the triplet loss with running BatchNorm statistics and no dropout."""

  model = _with_axis_name(model, axis_name)

  def eval_step(state: TrainState, batch: dict) -> dict:
    (za, zn, zd), _ = _forward(model, state.params, state.batch_stats, batch, train=False)
    _, metrics = loss_fn(za, zn, zd, axis_name=axis_name)
    if axis_name is not None:
      metrics = jax.lax.pmean(metrics, axis_name)
    return metrics

  eval_step.axis_name = axis_name
  return eval_step


def make_embed_fn(model: nn.Module):
  """Jitted `embed(variables, tiles) -> [N, embedding_dim]`, inference mode; variables = {params, batch_stats}."""
  return jax.jit(lambda variables, tiles: model.apply(variables, tiles, train=False))


def init_loop_metrics(loss_fn: Callable, embedding_dim: int = 2) -> dict:
  """The accumulator `make_train_loop` carries: per-metric sums over good steps, their count, and the first
  non-finite step (-1 while there is none) with its loss and gradient norm."""
  z = jnp.zeros((2, embedding_dim), jnp.float32)
  names = sorted(jax.eval_shape(lambda: loss_fn(z, z, z))[1]) + ['grad_norm']
  return {'sums': {name: np.float32(0) for name in names}, 'count': np.int32(0), 'first_bad_step': np.int32(-1),
          'bad_loss': np.float32(np.nan), 'bad_grad_norm': np.float32(np.nan)}


def make_train_loop(train_step, batch_fn: Callable):
  """`loop(state, acc, data, lrs, rng, num_steps) -> (state, acc)`: `num_steps` train steps in one compiled call.

  `train_step` is built with guard=False; `rng` is raw key data; `batch_fn(data, step, k)` gives step `step`'s
  batch (the k-th of this call) from `data` (packed features on the device, or the steps' batches sent from the
  host); `lrs` [K] holds each step's learning rate, and `num_steps` (a device scalar, at most K) how many to run: one
  compilation serves calls of any length up to K, so checkpoints, evaluations and logs can fall anywhere. Metrics
  stay on the device, summed into `acc` (`init_loop_metrics`). The first step whose loss, gradient or new state is
  not finite is recorded in acc['first_bad_step'] and is sticky: that step and every later one leave the state as
  it was, so the caller, fetching `acc` when it likes, stops with the last good state.
  """

  def loop(state, acc, data, lrs, rng, num_steps):
    rng = jax.random.wrap_key_data(rng)  # Placed as raw key data (DataParallel.put_replicated).

    def body(k, carry):
      state, acc = carry
      new_state, metrics = train_step(state, batch_fn(data, state.step, k), rng, lrs[k])
      finite = metrics['finite'] > 0
      healthy = acc['first_bad_step'] < 0
      keep = finite & healthy
      state = jax.tree.map(lambda new, old: jnp.where(keep, new, old), new_state, state)
      first_bad = healthy & ~finite
      acc = {
          'sums': {name: total + jnp.where(keep, metrics[name], 0.0) for name, total in acc['sums'].items()},
          'count': acc['count'] + keep.astype(jnp.int32),
          'first_bad_step': jnp.where(first_bad, state.step, acc['first_bad_step']),
          'bad_loss': jnp.where(first_bad, metrics['loss'], acc['bad_loss']),
          'bad_grad_norm': jnp.where(first_bad, metrics['grad_norm'], acc['bad_grad_norm']),
      }
      return state, acc

    return jax.lax.fori_loop(0, num_steps, body, (state, acc))

  loop.axis_name = getattr(train_step, 'axis_name', None)
  return loop
