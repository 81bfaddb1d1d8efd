"""Tiles for the train step: the features packed once into float16, then cut on the device or streamed from the host.

At start the clips of a split are read once from the feature store into one packed float16 array, every timeline
(see `sampler`) contiguous, so a tile is one slice of rows (`pack_timelines`). Then one of two stores feeds the step:

- 'device': the packed array and the sampler's tables are placed on every local device; the compiled step draws the
  triplets with `jax.random` (key folded with the step) and cuts the tiles itself (`device_batch_fn`). Nothing
  crosses from the host per step.
- 'host': for data larger than device memory. The packed array stays in host memory; a thread draws the same
  triplets (the same jax function, on the host's CPU), copies the tiles into float16 buffers and sends them to the
  devices two dispatches ahead (`HostTileLoader`); the step casts them.
'auto' takes the device store when the packed split fits in `device_memory_fraction` of a device's memory.

Both stores give a step the same tiles for the same (seed, step): the choice changes speed and memory, never data.
A split too large for the host (more than `host_memory_fraction` of its memory, under 'auto') is not packed at all:
the streamed store (`streaming`) keeps a window of it per process, which changes what is drawn (distant tiles come
from the window).
Hand-written rather than grain: a batch is a pure function of (seed, step) computed by the sampler, and on the
device path there is no host pipeline at all.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os

import jax
from jax import lax
import numpy as np

from dem_jax.features import Features
from dem_jax.sampler import ROLES, TripletSampler, triplet_rows

STORES = ('auto', 'device', 'host', 'stream')
_PACK_READ_BYTES = 64 << 20  # Reads in flight while packing.


class StoreError(ValueError):
  """The packed features do not fit where they were asked to go; the message gives the sizes and the fix."""


def pack_timelines(features: Features, sampler: TripletSampler) -> np.ndarray:
  """float16 [sampler.total_frames, n_mels]: the sampler's timelines end to end, in its order.

  Reads go through tensorstore, a timeline's clips in one read when they lie next to each other in the store.
  Non-finite values are refused (a store written by an older preprocessing job could hold them).
  """
  out = np.empty((sampler.total_frames, features.n_mels), np.float16)
  requests = []  # (first frame in the store, frames, first row in `out`)
  row = 0
  for timeline in sampler.timelines:
    for clip in timeline.clips:
      prev = requests[-1] if requests else None
      if prev and prev[0] + prev[1] == clip.frame_offset and prev[2] + prev[1] == row:
        requests[-1] = (prev[0], prev[1] + clip.num_frames, prev[2])
      else:
        requests.append((clip.frame_offset, clip.num_frames, row))
      row += clip.num_frames
  batch_frames = max(1, _PACK_READ_BYTES // (features.n_mels * 2))
  start = 0
  while start < len(requests):
    chunk, frames = [], 0
    while start < len(requests) and (not chunk or frames + requests[start][1] <= batch_frames):
      chunk.append(requests[start])
      frames += requests[start][1]
      start += 1
    futures = [features.read_stored(offset, count) for offset, count, _ in chunk]
    for (offset, count, first), future in zip(chunk, futures):
      out[first:first + count] = future.result()
  _check_finite(out, sampler)
  return out


def _check_finite(packed: np.ndarray, sampler: TripletSampler, block: int = 1 << 20) -> None:
  for start in range(0, packed.shape[0], block):
    bad = ~np.isfinite(packed[start:start + block]).all(axis=1)
    if bad.any():
      row = start + int(np.argmax(bad))
      timeline = int(np.searchsorted(sampler.tables.row_offset, row, side='right')) - 1
      t = sampler.timelines[timeline]
      within = row - int(sampler.tables.row_offset[timeline])
      clip = t.clips[int(np.searchsorted(t.starts, within, side='right')) - 1]
      raise StoreError(f'The features of clip {clip.clip_id} ({clip.path}) hold non-finite values (inf or NaN; '
                       'float32 features beyond the float16 range also become inf). Preprocess the data again '
                       'with a current dem_jax, which refuses non-finite frames.')


def device_memory_bytes(device) -> int:
  """What one device can hold: its allocator's limit (GPU/TPU), else the host's physical memory (CPU devices)."""
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  return host_memory_bytes()


def host_memory_bytes() -> int:
  """The host's physical memory."""
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def choose_store(store: str, nbytes: int, devices: list, fraction: float, host_fraction: float = 1.0
                 ) -> tuple[str, str]:
  """('device' | 'host' | 'stream', why) for packed features of `nbytes` and these local devices.

  CPU devices share the host's memory, so there every local device's copy counts against it. 'auto' streams when
  the packed split exceeds `host_fraction` of the host's memory, where every process of a host would pack it whole.
  """
  if store not in STORES:
    raise StoreError(f"config.data.store={store!r}; choose one of {STORES}.")
  if not 0 < fraction <= 1:
    raise StoreError(f'config.data.device_memory_fraction={fraction} must lie in (0, 1].')
  if not 0 < host_fraction <= 1:
    raise StoreError(f'config.data.host_memory_fraction={host_fraction} must lie in (0, 1].')
  host = host_memory_bytes()
  if store == 'stream' or (store == 'auto' and nbytes > host_fraction * host):
    return 'stream', (f'{nbytes / 2**30:.2f} GiB of packed float16 features, {host_fraction * host / 2**30:.2f} GiB '
                      f'allowed in host memory ({host_fraction:g} of {host / 2**30:.1f} GiB)')
  per_device = device_memory_bytes(devices[0])
  copies = len(devices) if devices[0].platform == 'cpu' else 1
  budget = fraction * per_device
  fits = nbytes * copies <= budget
  sizes = (f'{nbytes / 2**30:.2f} GiB of packed float16 features{" x %d CPU devices" % copies if copies > 1 else ""}'
           f', {budget / 2**30:.2f} GiB allowed ({fraction:g} of {per_device / 2**30:.1f} GiB per device)')
  if store == 'device' and not fits:
    raise StoreError(f"config.data.store='device', but {sizes}. Use config.data.store='host' (streams from host "
                     'memory), raise config.data.device_memory_fraction, or train on a smaller split.')
  if store == 'auto':
    store = 'device' if fits else 'host'
  return store, sizes


def gather_tiles(frames: jax.Array, rows: jax.Array, tile_frames: int) -> jax.Array:
  """[len(rows), tile_frames, M]: the tiles starting at `rows` of the packed features (inside a compiled step)."""
  return jax.vmap(lambda r: lax.dynamic_slice_in_dim(frames, r, tile_frames, axis=0))(rows)


def read_batch(features: Features, sampler: TripletSampler, step: int, global_batch: int, share: Share | None = None
               ) -> dict[str, np.ndarray]:
  """{role: float16 [local batch, T, M]}: this process's rows of step `step`'s batch read tile by tile from the store,
  the tiles `HostTileLoader.cut` takes from the packed split. For the few held-out batches, which need no packing."""
  share = share or Share()
  local = global_batch // share.count
  rows = slice(share.index * local, (share.index + 1) * local)
  triplets = sampler.sample(step, global_batch)
  futures = {role: [[(clip_id, features.read_stored(features.clip(clip_id).frame_offset + start, stop - start))
                     for clip_id, start, stop in sampler.pieces(int(t), int(p))]
                    for t, p in zip(triplets[role][0][rows], triplets[role][1][rows])] for role in ROLES}
  out = {}
  for role, tiles in futures.items():
    out[role] = np.stack([np.concatenate([np.asarray(f.result()) for _, f in tile]) for tile in tiles])
    bad = ~np.isfinite(out[role]).all(axis=(1, 2))
    if bad.any():
      tile = tiles[int(np.argmax(bad))]
      clip = features.clip(tile[0][0])
      raise StoreError(f'The features of clip {clip.clip_id} ({clip.path}) hold non-finite values (inf or '
                       'NaN); preprocess the data again with a current dem_jax, which refuses non-finite frames.')
  return out


def device_batch_fn(parallel, *, batch_size: int, tile_frames: int, neighbour_frames: int):
  """`batch_fn(data, step, k)` for `train_step.make_train_loop` with data = (frames, tables, data_key) placed by
  `DataParallel.put_replicated`: draws step `step`'s global batch and cuts this device's share of its tiles (float16)."""

  def batch_fn(data, step, k):
    del k
    frames, tables, data_key = data
    data_key = jax.random.wrap_key_data(data_key)  # Placed as raw key data (DataParallel.put_replicated).
    rows = triplet_rows(tables, jax.random.fold_in(data_key, step), batch_size, neighbour_frames)
    return {role: parallel.shard_rows(rows[role], lambda r: gather_tiles(frames, r, tile_frames)) for role in ROLES}

  return batch_fn


def host_batch_fn(data, step, k):
  """`batch_fn` for batches sent from the host: data = {role: [K, B, T, M]}, one slice per step of the call."""
  del step
  return {role: data[role][k] for role in ROLES}


@dataclasses.dataclass(frozen=True)
class Share:
  """Which rows of the global batch this process feeds."""
  index: int = 0
  count: int = 1


class HostTileLoader:
  """Batches cut from the packed features in host memory, and sent to the devices ahead of need by one thread.

  `loader.get(step, n, ahead)` -> {role: float16 [K, local batch, T, M]} holding steps step..step+n-1 (n <= K; the
  rest of the K slots is unused), this process's rows of each global batch, already sent to the devices by `put`
  (e.g. `DataParallel.put_host_batches`). `ahead` lists the (step, n) of the next calls, which are prepared
  meanwhile. Each call gets fresh buffers: on CPU devices the device array may alias the host buffer, so a buffer
  may only be reused once its steps have run, which the allocator's free list arranges without bookkeeping here.
  """

  def __init__(self, packed: np.ndarray, sampler: TripletSampler, global_batch: int, steps_per_call: int, *,
               put=None, share: Share = Share()):
    if global_batch % share.count:
      raise ValueError(f'The batch size ({global_batch}) must be divisible by the number of processes '
                       f'({share.count}); change config.batch_size.')
    self.packed, self.sampler = packed, sampler
    self.global_batch, self.steps_per_call = global_batch, steps_per_call
    self.local_batch = global_batch // share.count
    self.rows = slice(share.index * self.local_batch, (share.index + 1) * self.local_batch)
    self.put = put or (lambda x: x)
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='host-tiles')
    self._pending: dict[tuple[int, int], concurrent.futures.Future] = {}

  def cut(self, step: int, n: int) -> dict[str, np.ndarray]:
    """{role: float16 [K, local batch, T, M]} with steps step..step+n-1 in its first n slots, in host memory."""
    tile = self.sampler.tile_frames
    out = {role: np.empty((self.steps_per_call, self.local_batch, tile, self.packed.shape[1]), self.packed.dtype)
           for role in ROLES}
    for k in range(n):
      rows = self.sampler.rows(step + k, self.global_batch)
      for role in ROLES:
        target = out[role][k]
        for i, r in enumerate(rows[role][self.rows]):
          target[i] = self.packed[r:r + tile]
    return out

  def _load(self, step: int, n: int):
    return self.put(self.cut(step, n))

  def get(self, step: int, n: int, ahead=()):
    if n > self.steps_per_call:
      raise ValueError(f'{n} steps in one call, more than the {self.steps_per_call} the loader was made for.')
    for key in [(step, n), *ahead]:
      if key not in self._pending:
        self._pending[key] = self._pool.submit(self._load, *key)
    future = self._pending.pop((step, n))
    for key in [k for k in self._pending if k[0] < step]:  # Calls skipped over.
      self._pending.pop(key).cancel()
    return future.result()

  def close(self) -> None:
    for future in self._pending.values():
      future.cancel()
    self._pool.shutdown(wait=True, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
