"""Running the step across devices: `jax.jit` over a device mesh (the default) or `jax.pmap` over local devices.

`DataParallel` compiles a step function one of two ways and moves things to where that compiled step wants them:
- 'jit': a 1-D 'data' mesh over every device of every process; the batch is sharded along its first axis, the
  state, keys, tables and (device-resident) features are replicated; XLA inserts the reductions. Each process feeds
  its own rows of the global batch.
- 'pmap': the same function mapped over the local devices with an axis name (BatchNorm statistics, gradients and
  metrics averaged across it); everything it takes carries a leading device axis.
The state (and the loop's metric accumulator) is donated in both. Parallelism lives here and in the step's axis
name only; the model knows nothing of it beyond BatchNorm's `axis_name`.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PMAP_AXIS = 'batch'
MESH_AXIS = 'data'
MODES = ('jit', 'pmap')


class DataParallel:
  """Compiles steps and places their inputs for 'jit' (device mesh) or 'pmap' (local devices).

  In 'pmap' mode the step must be built with `axis_name=PMAP_AXIS` (and the model's BatchNorm with the same), so
  that batch statistics, gradients and metrics are global; in 'jit' mode with no axis name, because XLA computes
  those over the sharded batch by itself.
  """

  def __init__(self, mode: str = 'jit', devices=None):
    if mode not in MODES:
      raise ValueError(f"config.parallel={mode!r}; choose 'jit' or 'pmap'.")
    self.mode = mode
    # pmap takes the devices of every process (each maps over its own); None means all of them.
    self.devices = list(devices) if devices else None
    self.local_devices = [d for d in (devices or jax.devices()) if d.process_index == jax.process_index()]
    self.num_devices = len(devices or jax.devices())
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

  # Compiling.

  def _pmap(self, fn, **kw):
    # pmap given no devices spans every process's devices (its collectives are global); explicit devices (tests)
    # restrict it to the local ones.
    return jax.pmap(fn, axis_name=PMAP_AXIS, devices=None if self.devices is None else self.local_devices, **kw)

  def compile_train_step(self, step_fn):
    """`step(state, batch, rng, lr) -> (state, metrics)`, the state donated; rng and lr the same everywhere."""
    self._check_axis_name(step_fn)
    if self.mode == 'pmap':
      return self._pmap(step_fn, in_axes=(0, 0, None, None), donate_argnums=(0,))
    return jax.jit(step_fn, in_shardings=(self.replicated, self.sharded, self.replicated, self.replicated),
                   out_shardings=(self.replicated, self.replicated), donate_argnums=(0,))

  def compile_eval_step(self, step_fn):
    self._check_axis_name(step_fn)
    if self.mode == 'pmap':
      return self._pmap(step_fn)
    return jax.jit(step_fn, in_shardings=(self.replicated, self.sharded), out_shardings=self.replicated)

  def compile_train_loop(self, loop_fn, *, data_sharded: bool = False, data_per_device: bool = False):
    """`loop(state, acc, data, lrs, rng, num_steps) -> (state, acc)` (train_step.make_train_loop), state and acc
    donated.

    Everything comes placed: data by `put_replicated` (device-resident features), `put_host_batches`
    (data_sharded=True) or `put_per_device`/`put_per_process` (data_per_device=True: a streamed window, each
    process's own), the rest by `put_replicated`.
    """
    self._check_axis_name(loop_fn)
    if self.mode == 'pmap':
      return self._pmap(loop_fn, donate_argnums=(0, 1))
    data = NamedSharding(self.mesh, P(None, MESH_AXIS)) if data_sharded else self.replicated
    data = self.per_device_sharding if data_per_device else data
    r = self.replicated
    return jax.jit(loop_fn, in_shardings=(r, r, data, r, r, r), out_shardings=(r, r), donate_argnums=(0, 1))

  # Batches cut on the device.

  def shard_rows(self, rows: jax.Array, gather: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """`gather(rows)` of this device's share of a global batch of `rows` (traced inside a compiled step).

    Every device draws the whole batch's rows (a few integers), then cuts only its own tiles: pmap takes its slice
    by axis index; jit cuts each shard on its own device (shard_map), instead of every device cutting every tile.
    """
    if self.mode == 'pmap':
      return gather(rows.reshape(self.num_devices, -1)[lax.axis_index(PMAP_AXIS)])
    rows = lax.with_sharding_constraint(rows, self.sharded)
    return jax.shard_map(gather, mesh=self.mesh, in_specs=P(MESH_AXIS), out_specs=P(MESH_AXIS))(rows)

  # Placement.

  def put_replicated(self, tree):
    """Host values placed once: one copy per local device (pmap, with a leading device axis) or replicated over
    the mesh (jit). Works with several processes (each passes the same values). Typed keys are placed as their raw
    uint32 data (multi-process pmap would copy typed keys back to the host on every call): the compiled function
    wraps them again with `jax.random.wrap_key_data`."""
    def put(x):
      if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
      x = np.asarray(x)
      if self.mode == 'pmap':
        shards = [jax.device_put(x[None], d) for d in self.local_devices]
        return jax.make_array_from_single_device_arrays((len(shards),) + x.shape, self.stacked, shards)
      return jax.make_array_from_callback(x.shape, self.replicated, lambda index: x[index])
    return jax.tree.map(put, tree)

  # Per-process values: a streamed store's window differs between processes, so it cannot be replicated.

  @property
  def per_device_sharding(self) -> NamedSharding:
    """Of arrays with a leading device axis (`per_device_count` long), each device holding its own entry."""
    return self.stacked if self.mode == 'pmap' else self.sharded

  @property
  def per_device_count(self) -> int:
    """The leading axis of per-device arrays: the local devices (pmap) or every device of the mesh (jit)."""
    return len(self.local_devices) if self.mode == 'pmap' else self.num_devices

  def put_per_device(self, values: list):
    """values[j] (numpy trees of one structure) on this process's j-th device, in the order in which its rows of
    a batch are split across them (`put_host_batches`), as arrays [per_device_count, ...]. CPU devices may use the
    host memory itself (no copy), so a value must not change while its array is in use."""
    sharding = self.per_device_sharding
    if self.mode == 'pmap':
      position = {i: i for i in range(len(self.local_devices))}
    else:  # Mesh position -> rank among this process's devices.
      mine = [i for i, d in enumerate(self.mesh.devices.flat) if d.process_index == jax.process_index()]
      position = {i: j for j, i in enumerate(mine)}

    def put(*leaves):
      leaves = [np.asarray(x) for x in leaves]
      shape = (self.per_device_count,) + leaves[0].shape
      shards = [jax.device_put(leaves[position[index[0].start or 0]][None], device, may_alias=True)
                for device, index in sharding.addressable_devices_indices_map(shape).items()]
      return jax.make_array_from_single_device_arrays(shape, sharding, shards)
    return jax.tree.map(put, *values)

  def put_per_process(self, tree):
    """This process's values, one copy on each of its devices (see `put_per_device`)."""
    return self.put_per_device([tree] * len(self.local_devices))

  def put_state(self, state):
    """The state placed for the step: one copy per local device (pmap) or replicated over the mesh (jit)."""
    return self.put_replicated(jax.device_get(state))

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
    return jax.tree.map(lambda x: self._put_local_rows(np.asarray(x), self.sharded), batch)

  def put_host_batches(self, batches: dict):
    """Several steps' batches, {role: [K, local batch, ...]}, placed for the loop: [D, K, B/D, ...] for pmap
    (a copy-free view when K is 1), sharded along the batch axis for jit."""
    first = next(iter(batches.values()))
    self.check_batch(first.shape[1])
    if self.mode == 'pmap':
      n = len(self.local_devices)
      split = lambda x: np.moveaxis(x.reshape((x.shape[0], n, x.shape[1] // n) + x.shape[2:]), 1, 0)
      return jax.tree.map(lambda x: jax.device_put(split(x), self.stacked), batches)
    return jax.tree.map(lambda x: self._put_local_rows(x, NamedSharding(self.mesh, P(None, MESH_AXIS))), batches)

  @staticmethod
  def _put_local_rows(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    # One process holds the whole batch: device_put, several times faster than assembling it from process shares.
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, x)

  def get_metrics(self, metrics) -> dict:
    """Host floats of a step's metrics (already averaged across devices)."""
    if self.mode == 'pmap':
      metrics = jax.tree.map(lambda x: x[0], metrics)
    return jax.tree.map(lambda v: v.item(), jax.device_get(metrics))
