"""The streamed store: each process keeps a window of whole recordings, turned over by a reader thread as it trains.

For training splits larger than a host's memory (config.data.store='stream', or 'auto' when the packed split would
exceed config.data.host_memory_fraction of it). Instead of packing the whole split, every process holds at most
config.data.resident_gb of it, drawn from its own share of the recordings (timelines, see `sampler`):

- Shares: epoch e permutes the split's timelines with a seeded generator; process k of n takes every n-th one. The
  n processes together read the split once per epoch, each only its share.
- Segments: each share, in that order, is cut into S parts of about equal frames (S the same for every process and
  epoch), each small enough for one slot of resident_gb / (W + 2). The segments of all epochs form one sequence.
- Phases: step s belongs to phase p = s // P, with P about an epoch's steps / S. The window of phase p is segments
  p .. p + W - 1 (W = `WINDOW_SEGMENTS`, fewer when a share holds fewer segments): one segment leaves and one enters
  at each phase boundary, and over an epoch every recording of the share enters the window. A background thread
  reads the next segments, up to READ_AHEAD of them (large contiguous tensorstore reads of whole timelines, written
  straight into host memory), while the step trains.
- Draws: step s's triplets are `sample_triplets` over the window's tables, with the key folded with s and then with
  the process; each process draws its own rows of the global batch (global batch / n), and each of its devices
  cuts its slice of them. Anchor and neighbour come from one resident timeline, the distant tile from a resident
  timeline of another group (or recording).

Everything above is a function of (seed, step, process), so a resumed run reads the window of its step and nothing
before it, and sees the batches an uninterrupted run saw. Windows are indexed within themselves (int32 rows of at
most resident_gb), so no split is too large.

Where the window lives: on the devices when its W slots fit config.data.device_memory_fraction of one device (the
step draws and cuts its tiles, as the device store does; at a phase boundary one slot is overwritten in place), else
in host memory (a thread cuts the tiles and sends them two calls ahead, as the host store does). Both give the same
tiles for the same step. What a run learns differs from the packed stores: distant tiles come from the window, not
the whole split (docs/data.md).
"""

from __future__ import annotations

import collections
import functools
import math
import threading
import time

import jax
from jax import lax
from jax.sharding import PartitionSpec as P
import numpy as np

from dem_jax.features import Features, FeaturesError, store_context
from dem_jax.input_pipeline import (READ_PIECE_BYTES, HostTileLoader, Share, StoreError, contiguous_reads,
                                    device_memory_bytes, gather_tiles, host_batch_fn, host_memory_bytes, read_rows,
                                    refuse_non_finite)
from dem_jax.parallel import MESH_AXIS
from dem_jax.sampler import ROLES, SamplerError, SamplerTables, TripletSampler, triplet_rows, window_tables

WINDOW_SEGMENTS = 4  # Segments drawn from at once: one in W turns over per phase, so the window changes gradually.
READ_AHEAD = 2  # Segments read beyond the window: slack for a read slower than a phase.
_STREAM_KEY = 0x57EA


class StreamSchedule:
  """Which timelines process `process` of `num_processes` holds at every step: a pure function of (seed, step,
  process), built from the sampler's timelines alone (nothing is read).

  Args:
    sampler: the training split's timelines (its packed tables are never built).
    resident_bytes: what the stream may hold: W window slots and READ_AHEAD read ahead.
    n_mels: bands per frame (float16 frames).
    steps_per_epoch: the run's steps per epoch (global batch).
  """

  def __init__(self, sampler: TripletSampler, *, resident_bytes: int, n_mels: int, steps_per_epoch: int,
               process: int = 0, num_processes: int = 1, seed: int = 0, window_segments: int = WINDOW_SEGMENTS):
    self.sampler, self.seed = sampler, seed
    self.process, self.num_processes = process, num_processes
    lengths = sampler.lengths
    count = len(lengths)
    what = 'group (session)' if sampler.distant_other_group else 'recording'
    if count < 2 * num_processes:
      raise StoreError(f'The training split has {count} usable recordings (timelines), fewer than two for each of '
                       f'{num_processes} processes: a streamed window needs a distant {what}. Use '
                       "config.data.store='host' or fewer processes.")
    frame_bytes = 2 * n_mels
    slots = window_segments + READ_AHEAD
    self.slot_frames = int(resident_bytes // slots // frame_bytes)
    longest = int(lengths.max())
    if self.slot_frames <= longest:
      least = slots * 2 * longest * frame_bytes / 2**30
      raise StoreError(f'config.data.resident_gb={resident_bytes / 2**30:.4g} is too small: its {slots} '
                       f'slots of {self.slot_frames} frames are shorter than the longest recording ({longest} frames). '
                       f'Raise config.data.resident_gb to at least {least:.3g}.')
    share = -(-count // num_processes)
    # Every share of every epoch holds at most the `share` longest timelines: S is fixed before any permutation.
    bound = int(np.sort(lengths)[::-1][:share].sum())
    self.segments_per_epoch = max(1, math.ceil(bound / (self.slot_frames - longest)))
    self.window_segments = min(window_segments, self.segments_per_epoch)
    self.phase_steps = max(1, steps_per_epoch // self.segments_per_epoch)
    # Table entries a window can need: W segments of at most slot_frames / shortest timelines, from at most 2 epochs.
    self.max_timelines = int(min(self.window_segments * (self.slot_frames // int(lengths.min())), 2 * share))
    self.window_frames = self.window_segments * self.slot_frames
    self._shares = collections.OrderedDict()

  def share(self, epoch: int) -> np.ndarray:
    """This process's timelines in epoch `epoch`, in the order they are read."""
    if epoch not in self._shares:
      order = np.random.default_rng([self.seed, _STREAM_KEY, epoch]).permutation(len(self.sampler.lengths))
      self._shares[epoch] = order[self.process::self.num_processes]
      while len(self._shares) > 3:
        self._shares.popitem(last=False)
    return self._shares[epoch]

  def segment(self, index: int) -> np.ndarray:
    """The timelines of segment `index` of the sequence (epoch index // S, part index % S)."""
    epoch, part = divmod(index, self.segments_per_epoch)
    share = self.share(epoch)
    frames = self.sampler.lengths[share]
    starts = np.cumsum(frames) - frames
    # Part j: the timelines that start within the j-th S-th of the share's frames (at most F/S + longest frames).
    which = starts * self.segments_per_epoch // max(int(frames.sum()), 1)
    return share[which == part]

  def phase(self, step: int) -> int:
    return int(step) // self.phase_steps

  def window(self, phase: int) -> range:
    """The segments resident during `phase`."""
    return range(phase, phase + self.window_segments)

  def tables(self, phase: int, slot_of) -> SamplerTables:
    """The draw's tables over the window of `phase`, rows numbered within the window's slots (`slot_of(segment)`),
    padded to `max_timelines`. StoreError when the window holds fewer than two owners."""
    members, rows = [], []
    for index in self.window(phase):
      timelines = self.segment(index)
      frames = self.sampler.lengths[timelines]
      members.append(timelines)
      rows.append(slot_of(index) * self.slot_frames + np.cumsum(frames) - frames)
    timelines, rows = np.concatenate(members), np.concatenate(rows)
    owners = self.sampler.owner_ids[timelines]
    order = np.lexsort((timelines, owners))  # By owner, so that each owner's positions form one interval.
    timelines, rows, owners = timelines[order], rows[order], owners[order]
    if len(np.unique(owners)) < 2:
      what = 'group (session)' if self.sampler.distant_other_group else 'recording'
      raise StoreError(f'The streamed window of process {self.process} in phase {phase} holds recordings of a single '
                       f'{what} ({len(timelines)} recordings resident), so no distant tile can be drawn. Raise '
                       'config.data.resident_gb' + (', or set config.data.distant_other_group=False.'
                                                    if self.sampler.distant_other_group else '.'))
    return window_tables(self.sampler.valid[timelines], owners, rows, size=self.max_timelines,
                         what=f'{self.window_frames} frames of the window', fix='lower config.data.resident_gb')


class WindowReader:
  """Reads the schedule's segments, in order, into a ring of host slots on a background thread.

  Segment g goes to slot g % slots once the segment that held the slot has been released (`release_below`);
  `wait(g)` blocks until segment g is in. Read errors (a lost shard, an unreachable store) and, with
  `check_finite`, non-finite frames are raised by `wait` as StoreError.
  """

  def __init__(self, features: Features, schedule: StreamSchedule, *, slots: int, first: int,
               check_finite: bool = True):
    self.features, self.schedule, self.slots = features, schedule, slots
    self.check_finite = check_finite
    self.slot_frames = schedule.slot_frames
    # np.empty touches no page: memory is taken as segments arrive.
    self.ring = np.empty((slots * self.slot_frames, features.n_mels), np.float16)
    # No chunk cache (every frame is read once per epoch), and a lost shard is an error, not zeros.
    self._array = features.open_array(context=store_context(0), fill_missing=False)
    self.bytes_read, self.read_seconds = 0, 0.0
    self._cond = threading.Condition()
    self._loaded = self._free_below = first
    self._error: Exception | None = None
    self._stop = False
    self._thread = threading.Thread(target=self._run, args=(first,), name='stream-reader', daemon=True)
    self._thread.start()

  def rows(self, index: int) -> slice:
    """The ring rows of segment `index`'s slot."""
    base = (index % self.slots) * self.slot_frames
    return slice(base, base + self.slot_frames)

  def _run(self, index: int) -> None:
    while True:
      with self._cond:
        self._cond.wait_for(lambda: self._stop or index < self._free_below + self.slots)
        if self._stop:
          return
      try:
        self._read(index)
      except Exception as e:  # Raised where the segment is needed (`wait`), in the training thread.
        with self._cond:
          self._error = e
          self._cond.notify_all()
        return
      with self._cond:
        self._loaded = index + 1
        self._cond.notify_all()
      index += 1

  def _read(self, index: int) -> None:
    """Segment `index` into its slot: its timelines' clips end to end, in large contiguous reads."""
    t0 = time.perf_counter()
    clips = (clip for t in self.schedule.segment(index) for clip in self.schedule.sampler.timelines[t].clips)
    reads = contiguous_reads(clips, self.rows(index).start,
                             piece_frames=max(1, READ_PIECE_BYTES // (2 * self.features.n_mels)))
    landed = (lambda offset, frames: refuse_non_finite(self.features, offset, frames)) if self.check_finite else None
    done = read_rows(self._array, reads, self.ring, store=self.features.root, landed=landed)
    with self._cond:
      self.bytes_read += done
    self.read_seconds += time.perf_counter() - t0

  def wait(self, index: int) -> None:
    with self._cond:
      self._cond.wait_for(lambda: self._loaded > index or self._error is not None or self._stop)
      if self._loaded > index:
        return
      error = self._error
    if isinstance(error, (StoreError, FeaturesError, SamplerError)):
      raise error
    raise StoreError(f'The streamed store\'s reader failed on {self.features.root}: {error!r}') from error

  def release_below(self, index: int) -> None:
    """Segments before `index` are no longer needed: their slots may take the next ones."""
    with self._cond:
      self._free_below = max(self._free_below, index)
      self._cond.notify_all()

  def close(self) -> None:
    with self._cond:
      self._stop = True
      self._cond.notify_all()
    self._thread.join()


def window_rows(tables: SamplerTables, key: jax.Array, step, process, batch_size: int, neighbour_frames: int):
  """{role: [batch_size] first window row of each tile}: process `process`'s rows of step `step`'s batch."""
  key = jax.random.fold_in(jax.random.fold_in(key, step), process)
  return triplet_rows(tables, key, batch_size, neighbour_frames)


_window_rows_on_host = jax.jit(window_rows, static_argnums=(4, 5))


@functools.partial(jax.jit, static_argnums=(2,), donate_argnums=(0,))
def _write_slot(window: jax.Array, segment: jax.Array, first_row: int, frames) -> tuple[jax.Array, jax.Array]:
  """The window [D, W * slot, M] with one slot's rows replaced by `segment` [D, slot, M], in place, and [D] whether
  the segment's first `frames` [D] rows (the rest of a slot is unused) are finite on each device: checked here, in
  the copy's pass, rather than by the reader thread."""
  used = jax.numpy.arange(segment.shape[1])[None, :, None] < frames[:, None, None]
  return (lax.dynamic_update_slice_in_dim(window, segment, first_row, axis=1),
          (jax.numpy.isfinite(segment) | ~used).all(axis=(1, 2)))


class StreamStore:
  """The streamed training split of one process: `get(step, n, ahead)` gives what the compiled loop takes as `data`
  for steps step..step+n-1 (never across a multiple of `phase_steps`), `batch_fn` cuts the step's tiles from it.

  Args:
    features, sampler: the store and the training split's timelines.
    parallel: the `DataParallel` the loop is compiled with.
    global_batch, steps_per_call: the run's batch and the loop's K.
    resident_gb: config.data.resident_gb; device_fraction: config.data.device_memory_fraction.
    start_step: the first step to train (a resumed run reads only that step's window).
    place: 'auto' (device when the window fits), 'device' or 'host'.
    share: (this process, processes); default jax's.
  """

  def __init__(self, features: Features, sampler: TripletSampler, parallel, *, global_batch: int,
               steps_per_call: int, steps_per_epoch: int, resident_gb: float, device_fraction: float,
               start_step: int = 0, seed: int = 0, place: str = 'auto', share: Share | None = None):
    share = share or Share(jax.process_index(), jax.process_count())
    process, processes = share.index, share.count
    resident = int(resident_gb * 2**30)
    memory = host_memory_bytes()
    if not 0 < resident < memory:
      raise StoreError(f'config.data.resident_gb={resident_gb:g} must be above 0 and below this host\'s memory '
                       f'({memory / 2**30:.1f} GiB); lower it (half the memory or less leaves room for the rest).')
    if global_batch % processes:
      raise StoreError(f'The batch size ({global_batch}) must be divisible by the number of processes ({processes}); '
                       'change config.batch_size.')
    self.parallel, self.sampler, self.features = parallel, sampler, features
    self.local_batch = global_batch // processes
    self.schedule = StreamSchedule(sampler, resident_bytes=resident, n_mels=features.n_mels,
                                   steps_per_epoch=steps_per_epoch, process=process, num_processes=processes,
                                   seed=seed)
    self.phase_steps = self.schedule.phase_steps
    self.process = process
    self.key = jax.random.fold_in(jax.random.key(seed), _STREAM_KEY)
    window_bytes = self.schedule.window_frames * features.n_mels * 2
    devices = parallel.local_devices
    copies = len(devices) if devices[0].platform == 'cpu' else 1
    fits = window_bytes * copies <= device_fraction * device_memory_bytes(devices[0])
    self.place = ('device' if fits else 'host') if place == 'auto' else place
    first = self.schedule.window(self.schedule.phase(start_step))[0]
    t0 = time.perf_counter()
    if self.place == 'device':
      self._loader = _DeviceWindow(self, first)
    else:
      self._loader = _HostWindow(self, first, global_batch, steps_per_call, share=share)
    try:
      self.data = self._loader.first(start_step)
    except BaseException:  # The reader thread stops with the store that could not start.
      self._loader.close()
      raise
    self.first_window_seconds = time.perf_counter() - t0
    self.batch_fn = self._loader.batch_fn
    self.data_layout = self._loader.data_layout

  @property
  def reader(self) -> WindowReader:
    return self._loader.reader

  def describe(self) -> str:
    s = self.schedule
    return (f'a window of {s.window_segments} segments of up to {s.slot_frames * self.features.n_mels * 2 / 2**30:.3g} '
            f'GiB on the {self.place}, {s.segments_per_epoch} segments per epoch of this process\'s share, '
            f'{s.phase_steps} steps per segment')

  def get(self, step: int, n: int, ahead=()):
    if self.schedule.phase(step) != self.schedule.phase(step + n - 1):
      raise ValueError(f'Steps {step}..{step + n - 1} span two windows; split calls at multiples of '
                       f'{self.phase_steps} (StreamStore.phase_steps).')
    return self._loader.get(step, n, ahead)

  def close(self) -> None:
    self._loader.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class _HostWindow(HostTileLoader):
  """The window in host memory: W + READ_AHEAD slots; a thread draws each step's rows and copies the tiles, as
  `HostTileLoader` does for the packed split."""

  data_layout = {'data_sharded': True}

  def __init__(self, store: StreamStore, first: int, global_batch: int, steps_per_call: int, share: Share):
    self.store, self.schedule = store, store.schedule
    self.reader = WindowReader(store.features, self.schedule, slots=self.schedule.window_segments + READ_AHEAD,
                               first=first)
    super().__init__(self.reader.ring, store.sampler, global_batch, steps_per_call,
                     put=store.parallel.put_host_batches, share=share)
    self._phase, self._tables = None, None
    self._key = jax.device_put(store.key, jax.local_devices(backend='cpu')[0])
    self.batch_fn = host_batch_fn

  def first(self, step: int):
    self._tables_for(self.schedule.phase(step))  # Reads the window now: the first batch does not wait on it later.
    return None

  def _tables_for(self, phase: int):
    if phase != self._phase:
      self.reader.release_below(phase)  # Calls come in step order: earlier segments are done with.
      for index in self.schedule.window(phase):
        self.reader.wait(index)
      tables = self.schedule.tables(phase, slot_of=lambda index: index % self.reader.slots)
      self._tables = jax.device_put(tables, jax.local_devices(backend='cpu')[0])
      self._phase = phase
    return self._tables

  def rows_at(self, step: int) -> dict[str, np.ndarray]:
    """{role: [local batch] first ring row of each tile} of this process's share of step `step`'s batch."""
    tables = self._tables_for(self.schedule.phase(step))
    rows = _window_rows_on_host(tables, self._key, np.int32(step), np.int32(self.store.process),
                                self.store.local_batch, self.sampler.neighbour_frames)
    return jax.tree.map(np.asarray, rows)

  def cut(self, step: int, n: int) -> dict[str, np.ndarray]:
    tile = self.sampler.tile_frames
    out = {role: np.empty((self.steps_per_call, self.local_batch, tile, self.packed.shape[1]), self.packed.dtype)
           for role in ROLES}
    for k in range(n):
      rows = self.rows_at(step + k)
      for role in ROLES:
        target = out[role][k]
        for i, r in enumerate(rows[role]):
          target[i] = self.packed[r:r + tile]
    return out

  def close(self) -> None:
    super().close()
    self.reader.close()


class _DeviceWindow:
  """The window on the devices: W slots per device, each holding one segment; at a phase boundary the slot of the
  segment that leaves is overwritten in place with the one that enters (read meanwhile into READ_AHEAD host
  slots, each released once its copy into the window has run)."""

  data_layout = {'data_per_device': True}

  def __init__(self, store: StreamStore, first: int):
    self.store, self.schedule, self.parallel = store, store.schedule, store.parallel
    # Frames are checked finite on the devices, as they are copied into the window (`_write_slot`).
    self.reader = WindowReader(store.features, self.schedule, slots=READ_AHEAD, first=first, check_finite=False)
    s = self.schedule
    self.slots = [None] * s.window_segments  # The segment each device slot holds.
    self._pending = collections.deque()  # (segment, finite) of the slots written, until their copies have run.
    shape = (s.window_frames, store.features.n_mels)
    sharding = self.parallel.per_device_sharding
    self.window = jax.jit(lambda: jax.numpy.zeros((self.parallel.per_device_count,) + shape, np.float16),
                          out_shardings=sharding)()
    self.lanes = self.parallel.put_per_device([np.array([store.process, j], np.int32)
                                               for j in range(len(self.parallel.local_devices))])
    self.key_data = self.parallel.put_per_process(jax.random.key_data(store.key))
    self._phase, self._data = None, None
    self.batch_fn = _device_window_batch_fn(self.parallel, local_batch=store.local_batch,
                                            tile_frames=store.sampler.tile_frames,
                                            neighbour_frames=store.sampler.neighbour_frames)

  def first(self, step: int):
    return self.get(step, 1, ())

  def _settle(self, below: int = -1) -> None:
    """Releases the host slots of the segments whose copies into the window have run, waiting for those of the
    segments before `below`; a segment that is not finite is refused here."""
    while self._pending and (self._pending[0][0] < below or self._pending[0][1].is_ready()):
      index, finite = self._pending.popleft()
      if not all(np.asarray(shard.data).all() for shard in finite.addressable_shards):
        self._refuse_non_finite(index)  # The host slot still holds the segment: find the clip there.
      self.reader.release_below(index + 1)

  def _refuse_non_finite(self, index: int) -> None:
    ring = self.reader.ring[self.reader.rows(index)]
    row = 0
    for t in self.schedule.segment(index):
      for clip in self.schedule.sampler.timelines[t].clips:
        refuse_non_finite(self.reader.features, clip.frame_offset, ring[row:row + clip.num_frames])
        row += clip.num_frames
    raise StoreError(f'Segment {index} of the streamed window holds non-finite values; preprocess the data again '
                     'with a current dem_jax, which refuses non-finite frames.')

  def get(self, step: int, n: int, ahead=()):
    del n, ahead
    self._settle()
    phase = self.schedule.phase(step)
    if phase != self._phase:
      tables = self.schedule.tables(phase, slot_of=lambda index: index % len(self.slots))
      for index in self.schedule.window(phase):
        slot = index % len(self.slots)
        if self.slots[slot] == index:
          continue
        self._settle(below=index - self.reader.slots + 1)  # The reader needs that host slot back for this segment.
        self.reader.wait(index)
        segment = self.parallel.put_per_process(self.reader.ring[self.reader.rows(index)])
        used = self.schedule.sampler.lengths[self.schedule.segment(index)].sum()
        frames = self.parallel.put_per_process(np.int32(used))
        self.window, finite = _write_slot(self.window, segment, slot * self.schedule.slot_frames, frames)
        self.slots[slot] = index
        self._pending.append((index, finite))
      self._data = (self.window, self.parallel.put_per_process(tables), self.lanes, self.key_data)
      self._phase = phase
    return self._data

  def close(self) -> None:
    self.reader.close()


def _device_window_batch_fn(parallel, *, local_batch: int, tile_frames: int, neighbour_frames: int):
  """`batch_fn(data, step, k)` for a window on the devices: each device draws its process's rows of the step's
  batch (`window_rows`, as the host window does) and cuts its own slice of them."""
  per_device = local_batch // len(parallel.local_devices)

  def cut(window, tables, lane, key_data, step):
    rows = window_rows(tables, jax.random.wrap_key_data(key_data), step, lane[0], local_batch, neighbour_frames)
    mine = {role: lax.dynamic_slice_in_dim(rows[role], lane[1] * per_device, per_device) for role in ROLES}
    # The rows computed once: fused into the gather, their arithmetic would run for every element of every tile.
    mine = lax.optimization_barrier(mine)
    return {role: gather_tiles(window, mine[role], tile_frames) for role in ROLES}

  def batch_fn(data, step, k):
    del k
    if parallel.mode == 'pmap':  # Each device already sees its own entry of the leading axis.
      return cut(*data, step)

    def local(data, step):
      return cut(*jax.tree.map(lambda x: x[0], data), step)
    return jax.shard_map(local, mesh=parallel.mesh, in_specs=(P(MESH_AXIS), P()), out_specs=P(MESH_AXIS))(data, step)

  return batch_fn
