"""The train state, the optimiser, the pure triplet step, and the two ways to run it across devices.

`make_train_step` returns one pure function `train_step(state, batch, rng) -> (state, metrics)`. `DataParallel`
compiles that same function either with `jax.pmap` over the local devices (an axis name; gradients, metrics and
BatchNorm statistics averaged across devices) or with `jax.jit` over a 1-D 'data' mesh (batch sharded along its
first axis, state replicated; XLA inserts the reductions). The state is donated to the step in both.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

ROLES = ('anchor', 'neighbour', 'distant')
PMAP_AXIS = 'batch'
MESH_AXIS = 'data'


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def learning_rate_at(optimizer_config, step):
  """Staircase decay, as the original: lr * decay_rate ** floor(step / decay_steps). Works on numpy and jnp."""
  xp = jnp if isinstance(step, jax.Array) else np
  return optimizer_config.learning_rate * optimizer_config.decay_rate ** xp.floor(step / optimizer_config.decay_steps)


def _kernel_mask(params):
  """True on conv and dense kernels: the original put weight decay on every kernel, not on biases or BatchNorm."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == 'kernel', params)


def make_optimizer(optimizer_config) -> optax.GradientTransformation:
  """Adam with the staircase schedule, an L2 penalty on kernels and optional gradient-norm clipping.

  Reads learning_rate, decay_rate, decay_steps, weight_decay and grad_clip_norm (0 turns the last two off).
  The penalty's gradient, weight_decay * w, is added before Adam (coupled, as a `kernel_regularizer` term in the
  loss would be, which is what the original did) rather than put into the loss, so the logged loss stays the
  triplet loss; decay added after Adam would be AdamW, a different method. Clipping acts on the loss gradient alone.
  """
  schedule = lambda count: learning_rate_at(optimizer_config, count)
  parts = []
  if optimizer_config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(optimizer_config.grad_clip_norm))
  if optimizer_config.weight_decay:
    parts.append(optax.add_decayed_weights(optimizer_config.weight_decay, mask=_kernel_mask))
  parts.append(optax.adam(schedule))
  return optax.chain(*parts)


def create_train_state(rng, model: nn.Module, optimizer: optax.GradientTransformation,
                       tile_shape: tuple[int, int]) -> TrainState:
  """Initial state for tiles of `tile_shape` (frames, mel bands); not yet placed for a parallel step.

  The parameters are drawn with JAX's 'rbg' generator seeded from `rng`: XLA:CPU compiles every threefry call
  site slowly (about 0.5 s per randomly initialised array, 20 s for ResNet18), RBG's in a tenth of that.
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
                    axis_name: str | None = None):
  """`train_step(state, batch, rng) -> (state, metrics)`; batch holds float32 [B, T, M] per role.

  The dropout key is fold_in(rng, step), so a resumed run draws the same masks. With `axis_name` (pmap), gradients
  and metrics are averaged over it and the model's BatchNorm is set to average its batch statistics over it too
  (the step owns that setting, so the model's own axis_name does not matter). A step whose loss or gradient is not
  finite returns the state unchanged, with metrics['finite'] = 0 and the non-finite loss in metrics['loss'], so the
  caller can stop with the last good state in hand.
  """
  model = _with_axis_name(model, axis_name)

  def train_step(state: TrainState, batch: dict, rng) -> tuple[TrainState, dict]:
    dropout_rng = jax.random.fold_in(rng, state.step)
    if axis_name is not None:  # Different masks on every device, as one big batch would have.
      dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))

    def objective(params):
      (za, zn, zd), batch_stats = _forward(model, params, state.batch_stats, batch, train=True, rng=dropout_rng)
      loss, metrics = loss_fn(za, zn, zd, axis_name=axis_name)
      return loss, (metrics, batch_stats)

    (_, (metrics, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
      metrics = jax.lax.pmean(metrics, axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
    metrics['finite'] = finite.astype(jnp.float32)
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
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


class DataParallel:
  """Runs a step function over devices, by `jax.pmap` (local devices) or by `jax.jit` over a 1-D device mesh.

  Batches arrive as this process's numpy share of the global batch; the state moves between one host copy (for
  checkpoints) and its device form with `put_state` / `get_state`. In 'pmap' mode the step must be built with
  `axis_name=PMAP_AXIS` (and the model's BatchNorm with the same), so that batch statistics, gradients and metrics
  are global; in 'jit' mode with no axis name, because XLA computes those over the sharded batch by itself.
  """

  def __init__(self, mode: str = 'pmap', devices=None):
    if mode not in ('pmap', 'jit'):
      raise ValueError(f"config.parallel={mode!r}; choose 'pmap' or 'jit'.")
    self.mode = mode
    # pmap takes the devices of every process (each maps over its own); None means all of them.
    self.devices = list(devices) if devices else None
    self.local_devices = [d for d in (devices or jax.devices()) if d.process_index == jax.process_index()]
    # pmap given no devices spans every process's devices (its collectives are global); explicit devices (tests)
    # restrict it to those.
    self._pmap_devices = None if devices is None else self.local_devices
    self.axis_name = PMAP_AXIS if mode == 'pmap' else None
    if mode == 'jit':
      # Every device of every process; each process feeds its local rows of the global batch.
      self.mesh = Mesh(np.array(devices or jax.devices()), (MESH_AXIS,))
      self.replicated = NamedSharding(self.mesh, P())
      self.sharded = NamedSharding(self.mesh, P(MESH_AXIS))
    else:
      self.stacked = NamedSharding(Mesh(np.array(self.local_devices), (PMAP_AXIS,)), P(PMAP_AXIS))

  def _check_axis_name(self, step_fn) -> None:
    got = getattr(step_fn, 'axis_name', self.axis_name)
    if got != self.axis_name:
      raise ValueError(f'{self.mode} needs a step built with axis_name={self.axis_name!r}, got {got!r}; pass '
                       f'axis_name=DataParallel.axis_name to make_train_step/make_eval_step and create_model.')

  def check_batch(self, local_batch: int) -> None:
    n = len(self.local_devices)
    if local_batch % n:
      raise ValueError(f'The per-process batch ({local_batch}) does not divide across {n} local devices; make '
                       f'config.batch_size a multiple of the total device count ({n * jax.process_count()}), '
                       f'e.g. {-(-local_batch // n) * n * jax.process_count()}.')

  def compile_train_step(self, step_fn):
    """`step(state, batch, rng) -> (state, metrics)`, the state donated; rng is one key, the same everywhere."""
    self._check_axis_name(step_fn)
    if self.mode == 'pmap':
      return jax.pmap(step_fn, axis_name=PMAP_AXIS, in_axes=(0, 0, None), donate_argnums=(0,),
                      devices=self.devices)
    return jax.jit(step_fn, in_shardings=(self.replicated, self.sharded, self.replicated),
                   out_shardings=(self.replicated, self.replicated), donate_argnums=(0,))

  def compile_eval_step(self, step_fn):
    self._check_axis_name(step_fn)
    if self.mode == 'pmap':
      return jax.pmap(step_fn, axis_name=PMAP_AXIS, devices=self.devices)
    return jax.jit(step_fn, in_shardings=(self.replicated, self.sharded), out_shardings=self.replicated)

  def put_state(self, state):
    """The state placed for the step: one copy per local device (pmap) or replicated over the mesh (jit)."""
    if self.mode == 'pmap':
      n = len(self.local_devices)
      return jax.tree.map(lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (n,) + np.shape(x)),
                                                   self.stacked), state)
    return jax.device_put(state, self.replicated)

  def get_state(self, state):
    """One host copy of the state (numpy leaves)."""
    if self.mode == 'pmap':
      state = jax.tree.map(lambda x: x[0], state)
    return jax.device_get(state)

  def put_batch(self, batch: dict):
    """This process's rows of the global batch, placed for the step: [D, B/D, ...] for pmap, sharded for jit."""
    first = next(iter(batch.values()))
    self.check_batch(first.shape[0])
    if self.mode == 'pmap':
      n = len(self.local_devices)
      return jax.tree.map(lambda x: jax.device_put(np.reshape(x, (n, x.shape[0] // n) + x.shape[1:]), self.stacked),
                          batch)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.sharded, np.asarray(x)), batch)

  def get_metrics(self, metrics) -> dict:
    """Host floats of a step's metrics (already averaged across devices)."""
    if self.mode == 'pmap':
      metrics = jax.tree.map(lambda x: x[0], metrics)
    return {k: float(v) for k, v in jax.device_get(metrics).items()}
