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

import collections
import concurrent.futures
import dataclasses
import os
from typing import Callable, Iterable

import jax
from jax import lax
import numpy as np
import tensorstore as ts

from dem_jax.features import Clip, Features, store_context
from dem_jax.sampler import ROLES, TripletSampler, triplet_rows

STORES = ('auto', 'device', 'host', 'stream')
READ_PIECE_BYTES = 8 << 20  # One tensorstore read into host memory (packing, the streamed window).
READS_IN_FLIGHT = 8  # Reads pending at once: enough to keep every core decoding.


class StoreError(ValueError):
  """The packed features do not fit where they were asked to go; the message gives the sizes and the fix."""


def pack_timelines(features: Features, sampler: TripletSampler) -> np.ndarray:
  """float16 [sampler.total_frames, n_mels]: the sampler's timelines end to end, in its order.

  Read through tensorstore straight into the packed array (`read_rows`), so that packing holds the array and a few
  pieces in flight, never a second copy of the split. Non-finite values are refused (a store written by an older
  preprocessing job could hold them).
  """
  out = np.empty((sampler.total_frames, features.n_mels), np.float16)
  reads = contiguous_reads((clip for timeline in sampler.timelines for clip in timeline.clips), 0,
                           piece_frames=max(1, READ_PIECE_BYTES // (2 * features.n_mels)))
  # No chunk cache: every frame is read once. Local stores had every shard file checked at open; within a shard,
  # tensorstore leaves out chunks equal to the fill value (zeros), which must read as zeros. A remote store's lost
  # shard is an error instead (never zeros).
  array = features.open_array(context=store_context(0), fill_missing=not features.remote)
  read_rows(array, reads, out, store=features.root,
            landed=lambda offset, frames: refuse_non_finite(features, offset, frames))
  return out


def contiguous_reads(clips: Iterable[Clip], first_row: int, piece_frames: int) -> list[tuple[int, int, int]]:
  """(store frame, frames, row) reads that lay `clips` end to end from row `first_row`: clips that lie next to each
  other in the store in one read, cut into pieces of at most `piece_frames` rows."""
  runs, row = [], first_row
  for clip in clips:
    if runs and runs[-1][0] + runs[-1][1] == clip.frame_offset:
      runs[-1][1] += clip.num_frames
    else:
      runs.append([clip.frame_offset, clip.num_frames, row])
    row += clip.num_frames
  return [(offset + s, min(piece_frames, count - s), first + s)
          for offset, count, first in runs for s in range(0, count, piece_frames)]


def read_rows(array: ts.TensorStore, reads: Iterable[tuple[int, int, int]], out: np.ndarray, *, store: str,
              landed: Callable[[int, np.ndarray], None] | None = None) -> int:
  """Reads each (store frame, frames, row) of `reads` into out[row:row + frames], READS_IN_FLIGHT at a time, and
  returns the bytes read. A float16 store's frames are written by tensorstore straight into `out` (no temporary); a
  float32 one's are read, then cast. `landed(store frame, rows of out)` runs on each read as it finishes. A failed
  read (a lost shard, an unreachable address) is a StoreError naming `store` and the frames."""
  pending, done = collections.deque(), 0

  def land():
    nonlocal done
    (offset, count, row), future = pending.popleft()
    try:
      result = future.result()
    except ValueError as e:
      raise StoreError(f'Reading frames {offset}..{offset + count} of {store} failed ({" ".join(str(e).split())[:300]}'
                       '): the store lost a file or became unreachable. Restore it (copy the whole store again) or '
                       'fix the address, then run the same command: training resumes from the last checkpoint.'
                       ) from None
    frames = out[row:row + count]
    if isinstance(result, np.ndarray):
      frames[...] = result
    if landed is not None:
      landed(offset, frames)
    done += frames.nbytes

  for offset, count, row in reads:
    source = array[offset:offset + count]
    # ts.array views the numpy memory, so tensorstore decodes into it.
    future = ts.array(out[row:row + count]).write(source) if array.dtype == ts.float16 else source.read()
    pending.append(((offset, count, row), future))
    if len(pending) >= READS_IN_FLIGHT:
      land()
  while pending:
    land()
  return done


def all_finite(frames: np.ndarray) -> bool:
  """Whether float16 `frames` hold no inf or NaN, at memory speed."""
  # float16 inf and NaN have all exponent bits set: as int16 the positive ones are >= 0x7C00, as uint16 the negative
  # ones >= 0xFC00. Two reductions, no temporary.
  return frames.view(np.int16).max(initial=0) < 0x7C00 and frames.view(np.uint16).max(initial=0) < 0xFC00


def refuse_non_finite(features: Features, offset: int, frames: np.ndarray) -> None:
  """StoreError naming the clip when float16 `frames` (the store's rows from `offset` on) hold inf or NaN."""
  if all_finite(frames):
    return
  bad = offset + int(np.argmax(~np.isfinite(frames).all(axis=1)))
  clip = next(c for c in features.clips if c.frame_offset <= bad < c.frame_offset + c.num_frames)
  raise StoreError(f'The features of clip {clip.clip_id} ({clip.path}) hold non-finite values (inf or NaN; float32 '
                   'features beyond the float16 range also become inf). Preprocess the data again with a current '
                   'dem_jax, which refuses non-finite frames.')


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
