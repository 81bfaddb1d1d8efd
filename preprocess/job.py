"""The preprocessing job: a dataset on disk -> log-Mel frames in a sharded zarr array, a manifest and statistics.

How it stays correct when split up, killed and restarted:
1. Plan. The sorted clip list and each clip's place in the array follow from the dataset and the settings alone
   (audio headers give each clip's largest possible frame count). Clips are packed into blocks, each starting on a
   shard boundary, so every block owns its shards. Every task computes the same plan; the first writes it.
2. Run. Task i of n takes a contiguous range of blocks; its workers process whole blocks. A block's frames are
   written with one tensorstore write, and only then its done marker (atomically renamed into place). A killed
   task, run again, redoes exactly the blocks without a marker.
3. Finalize. Once every block has its marker, the manifest, statistics and summary are assembled from the markers,
   and `features.json` is written last: until then the folder does not open as a finished output.
The output depends on the plan only, never on how many tasks or workers ran it.

What it refuses rather than guess at:
- A plan records its inputs (a hash of each list file, each clip's size and modification time). A run into a
  folder whose plan no longer matches its inputs, or whose settings differ, is refused with the fix, unless
  nothing was written yet, when the folder is planned again. A folder that holds anything but this job's own
  files (an older finished store without a plan, other data) is refused too.
- Frames are checked before they are stored: a clip whose log-Mel is not finite is a failure with its reason, and
  every statistic is checked at finalize. The store holds finite values only.
- Workers die with their parent, so a killed job leaves no process behind.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any

import numpy as np
import tensorstore as ts
import threadpoolctl
import tqdm

from dem_jax import audio
from dem_jax import datasets
from dem_jax import features as features_lib
from dem_jax.frontend import FrontEnd, log_mel

WORK_DIR = '.work'
PLAN_NAME = 'plan.json'
PLAN_VERSION = 2  # 2: the plan records its inputs.


class PreprocessError(Exception):
  """The job as a whole cannot go on; the message says how to fix it."""


def _atomic_write_json(path: str, obj: Any) -> None:
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _read_json(path: str, fix: str = 'delete the output folder and run the job again') -> Any:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise PreprocessError(f'{path} is damaged ({e}); {fix}.') from None


# A damaged done marker costs only its own block: the job redoes a block whose marker is missing.
_REDO_BLOCK = ('delete that file and run the same command again, which redoes that block and keeps the rest (an '
               'array job: run the task that owns the block again, then --finalize)')
# A damaged task record only held that task's wall time.
_REDO_TASK_RECORD = ('delete that file and run that task again (the same command; its finished blocks are kept), '
                     'then --finalize')


def _sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def settings_from_config(config, dataset: str, data_dir: str, split_file: str | None) -> dict:
  trim = {'auto': dataset == 'folder', 'yes': True, 'no': False}.get(config.trim_silence)
  if trim is None:
    raise PreprocessError(f"--config.trim_silence={config.trim_silence!r}; choose 'auto', 'yes' or 'no'.")
  try:
    frontend = FrontEnd.from_config(config.frontend)
  except ValueError as e:
    raise PreprocessError(f'--config.frontend: {e}') from None
  storage = dict(config.storage)
  if storage['compression'] not in ('zstd', 'blosc', 'none'):
    raise PreprocessError(f"--config.storage.compression={storage['compression']!r}; choose zstd, blosc or none.")
  for name in ('chunk_frames', 'shard_frames'):
    if isinstance(storage[name], bool) or not isinstance(storage[name], int) or storage[name] < 1:
      raise PreprocessError(f'--config.storage.{name}={storage[name]!r}; give a whole number of frames, 1 or more.')
  if storage['shard_frames'] % storage['chunk_frames']:
    raise PreprocessError('--config.storage.shard_frames must be a multiple of --config.storage.chunk_frames.')
  if storage['dtype'] not in ('float16', 'float32'):
    raise PreprocessError(f"--config.storage.dtype={storage['dtype']!r}; choose float16 or float32.")
  return {
      'dataset': dataset,
      'data_dir': os.path.abspath(data_dir),
      'split_file': os.path.abspath(split_file) if split_file else None,
      'split': dict(config.split),
      'frontend': dict(vars(frontend)),
      'trim_top_db': float(config.trim_top_db) if trim else None,
      'storage': storage,
  }


def _clip_capacity(path: str, frontend: FrontEnd) -> tuple[int, str | None]:
  """Largest frame count the clip can yield, from its header; (0, reason) when the header is unreadable."""
  try:
    info = audio.audio_info(path)
  except audio.AudioError as e:
    return 0, e.reason
  return frontend.num_frames(audio.max_resampled_length(info.num_samples, info.sample_rate,
                                                        frontend.sample_rate)), None


def _file_stamp(path: str) -> list[int] | None:
  try:
    st = os.stat(path)
  except OSError:
    return None
  return [st.st_size, st.st_mtime_ns]


def read_inputs(settings: dict, num_threads: int = 8) -> tuple[datasets.Dataset, dict]:
  """The dataset, and what its output depends on: each list file's hash, each clip's size and mtime (in order)."""
  dataset = datasets.read_dataset(settings['dataset'], settings['data_dir'], split_file=settings['split_file'],
                                  test_fraction=settings['split']['test_fraction'],
                                  split_seed=settings['split']['seed'])
  paths = [os.path.join(dataset.root, c.path) for c in dataset.clips]
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:  # stat waits on the disk, not the CPU.
    stamps = list(pool.map(_file_stamp, paths))
  inputs = {'lists': {p: _sha256(p) for p in dataset.list_files},
            'clips': [[c.path] + (stamp or [-1, -1]) for c, stamp in zip(dataset.clips, stamps)]}
  return dataset, inputs


def changed_inputs(old: dict, new: dict) -> list[str]:
  """What differs between two `read_inputs` records, in words (at most a few examples)."""
  changes = [f'{os.path.basename(p)} changed' for p in sorted(set(old['lists']) | set(new['lists']))
             if old['lists'].get(p) != new['lists'].get(p)]
  old_clips = {c[0]: c[1:] for c in old['clips']}
  new_clips = {c[0]: c[1:] for c in new['clips']}
  added = sorted(set(new_clips) - set(old_clips))
  removed = sorted(set(old_clips) - set(new_clips))
  modified = sorted(p for p in set(old_clips) & set(new_clips) if old_clips[p] != new_clips[p])
  for what, paths in (('added', added), ('removed', removed), ('modified', modified)):
    if paths:
      changes.append(f'{len(paths)} clip(s) {what} (e.g. {paths[0]})')
  return changes


def make_plan(settings: dict, num_threads: int = 8) -> dict:
  dataset, inputs = read_inputs(settings, num_threads)
  frontend = FrontEnd(**settings['frontend'])
  paths = [os.path.join(dataset.root, c.path) for c in dataset.clips]
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:  # Header reads wait on the disk, not the CPU.
    capacities = list(pool.map(lambda p: _clip_capacity(p, frontend), paths))
  shard = settings['storage']['shard_frames']
  clips, blocks = [], []
  offset = 0  # Next free frame; a new block starts at the next shard boundary.
  block_start = block_frames = 0
  for i, (clip, (capacity, _)) in enumerate(zip(dataset.clips, capacities)):
    if block_frames and block_frames + capacity > shard:
      blocks.append({'clips': [block_start, i], 'frame_start': offset, 'frames': block_frames})
      offset += -(-block_frames // shard) * shard
      block_start, block_frames = i, 0
    clips.append({**{k: v for k, v in vars(clip).items() if k != 'extra'}, 'extra': list(clip.extra),
                  'capacity': capacity, 'frame_offset': offset + block_frames})
    block_frames += capacity
  blocks.append({'clips': [block_start, len(clips)], 'frame_start': offset, 'frames': block_frames})
  offset += max(1, -(-block_frames // shard)) * shard
  return {'version': PLAN_VERSION, 'settings': settings, 'labels': dataset.labels, 'clips': clips, 'blocks': blocks,
          'total_frames': offset, 'problems': dataset.problems, 'warnings': dataset.warnings, 'inputs': inputs}


def _open_array(output_dir: str, settings: dict, total_frames: int, *, create: bool):
  storage = settings['storage']
  spec = features_lib.array_spec(os.path.join(output_dir, features_lib.ARRAY_NAME), num_frames=total_frames,
                                 n_mels=settings['frontend']['n_mels'], dtype=storage['dtype'],
                                 chunk_frames=storage['chunk_frames'], shard_frames=storage['shard_frames'],
                                 compression=storage['compression'])
  return ts.open(spec, create=create, open=True).result()


_LOCK_NAME = '.plan.lock'


def prepare_output_dir(output_dir: str) -> None:
  """Create the output folder, or say in one line why it cannot be used."""
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise PreprocessError(f'--output_dir={output_dir} is a file, not a folder; choose a folder path (it is created '
                          'when missing).')
  try:
    os.makedirs(output_dir, exist_ok=True)
  except OSError as e:
    raise PreprocessError(f'cannot create --output_dir={output_dir} ({e.strerror}); choose a place you can write '
                          'to.') from None
  if not os.access(output_dir, os.W_OK | os.X_OK):
    raise PreprocessError(f'--output_dir={output_dir} is not writable; fix its permissions or choose another '
                          'folder.')


def _nothing_written(output_dir: str) -> bool:
  blocks = os.path.join(output_dir, WORK_DIR, 'blocks')
  return (not os.path.exists(os.path.join(output_dir, features_lib.INFO_NAME))
          and not (os.path.isdir(blocks) and any(f.endswith('.json') for f in os.listdir(blocks))))


def _clear(output_dir: str) -> None:
  """Remove this job's own files from a folder in which nothing was written yet."""
  for name in (WORK_DIR, features_lib.ARRAY_NAME):
    path = os.path.join(output_dir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)


def _usable_plan(output_dir: str, settings: dict) -> dict | None:
  """This folder's plan if it matches the settings and inputs; None if there is none, or one that may be redone
  because nothing was written under it; PreprocessError (with the fix) when the folder must not be touched."""
  plan_path = os.path.join(output_dir, WORK_DIR, PLAN_NAME)
  try:
    plan = _read_json(plan_path)
  except FileNotFoundError:
    plan = None
  if plan is None:
    foreign = sorted(set(os.listdir(output_dir)) - {WORK_DIR, features_lib.ARRAY_NAME, _LOCK_NAME})
    if foreign:
      kind = ('a feature store this job did not plan (an older version, or its plan was removed)'
              if features_lib.INFO_NAME in foreign else f'other files ({", ".join(foreign[:3])})')
      raise PreprocessError(f'--output_dir={output_dir} holds {kind}; choose a new or empty --output_dir, or '
                            'delete the folder.')
    return None
  if plan.get('version') != PLAN_VERSION or plan.get('settings') != settings:
    old = plan.get('settings', {})
    changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if _nothing_written(output_dir):
      logging.info('preprocess: %s holds an unstarted plan with other settings; planning again.', output_dir)
      return None
    raise PreprocessError(
        f'{output_dir} already holds a run with other settings (differing: {", ".join(changed) or "version"}). '
        'Use a new --output_dir, delete the old one, or run with the same settings to finish it.')
  changes = changed_inputs(plan['inputs'], read_inputs(settings)[1])
  if not changes:
    return plan
  if _nothing_written(output_dir):
    logging.info('preprocess: the inputs changed before anything was written (%s); planning again.',
                 '; '.join(changes))
    return None
  raise PreprocessError(f'The inputs of {output_dir} changed since its plan was made ({"; ".join(changes)}); '
                        'finishing it would mix old and new audio. To redo it, delete the folder (or choose a new '
                        '--output_dir) and run again.')


@contextlib.contextmanager
def _planning_lock(output_dir: str):
  """Held while a plan is made: the tasks of an array job start together, and only one may clear and plan."""
  with open(os.path.join(output_dir, _LOCK_NAME), 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def load_or_make_plan(output_dir: str, settings: dict) -> dict:
  """The plan of this output folder; made (and the array created) if this is the first task to get here.

  A plan whose settings or inputs differ from this run's is refused once anything was written under it (its frames
  would mix with the new ones under the old manifest); while nothing was, the folder is planned afresh.
  """
  prepare_output_dir(output_dir)
  plan = _usable_plan(output_dir, settings)  # The usual case, without waiting on other tasks.
  if plan is not None:
    return plan
  with _planning_lock(output_dir):
    plan = _usable_plan(output_dir, settings)  # Another task may have planned meanwhile.
    if plan is not None:
      return plan
    _clear(output_dir)  # An unstarted plan, or what a run killed before writing its plan left.
    plan = make_plan(settings)
    work = os.path.join(output_dir, WORK_DIR)
    os.makedirs(os.path.join(work, 'blocks'), exist_ok=True)
    os.makedirs(os.path.join(work, 'tasks'), exist_ok=True)
    _open_array(output_dir, settings, plan['total_frames'], create=True)
    _atomic_write_json(os.path.join(work, PLAN_NAME), plan)  # Last: a plan on disk means its array exists.
  return plan


def _block_marker(output_dir: str, index: int) -> str:
  return os.path.join(output_dir, WORK_DIR, 'blocks', f'block-{index:06d}.json')


def task_blocks(num_blocks: int, task_index: int, num_tasks: int) -> range:
  """Task i of n takes the contiguous range of blocks [i * nb // n, (i + 1) * nb // n)."""
  if not 0 <= task_index < num_tasks:
    raise PreprocessError(f'--task_index={task_index} must lie in [0, --num_tasks={num_tasks}).')
  return range(task_index * num_blocks // num_tasks, (task_index + 1) * num_blocks // num_tasks)


# Per worker process: the open array, so that each block does not reopen it.
_WORKER: dict = {}


def _process_block(output_dir: str, plan_path: str, index: int) -> dict:
  """Decode, log-Mel, write one block; then write its done marker. Runs in a worker process."""
  if _WORKER.get('plan_path') != plan_path:
    plan = _read_json(plan_path)
    _WORKER.update(plan_path=plan_path, plan=plan,
                   array=_open_array(output_dir, plan['settings'], plan['total_frames'], create=False))
  plan, array = _WORKER['plan'], _WORKER['array']
  settings = plan['settings']
  frontend = FrontEnd(**settings['frontend'])
  dtype = np.dtype(settings['storage']['dtype'])
  block = plan['blocks'][index]
  first, last = block['clips']
  buffer = np.zeros((block['frames'], frontend.n_mels), dtype=dtype)
  results, sums = [], {}
  for clip in plan['clips'][first:last]:
    path = os.path.join(settings['data_dir'], clip['path'])
    result = {'clip_id': clip['clip_id'], 'num_frames': 0, 'duration': 0.0}
    try:
      samples, warnings = audio.read_audio(path, frontend.sample_rate, trim_top_db=settings['trim_top_db'])
      frames = log_mel(samples, frontend)
      if frames.shape[0] == 0:
        raise audio.AudioError(path, f'too short: {samples.shape[0]} samples after decoding, fewer than one '
                                     f'{frontend.win_length}-sample window')
      if frames.shape[0] > clip['capacity']:
        warnings.append(f'decoded to {frames.shape[0]} frames, more than its header promised '
                        f'({clip["capacity"]}); kept the first {clip["capacity"]}')
        frames = frames[:clip['capacity']]
      if not np.any(samples):
        warnings.append('digital silence (every sample is 0); kept')
      stored = frames.astype(dtype)
      # Statistics of the values as stored, so the normaliser matches what training reads. They double as the
      # check that nothing non-finite reaches the store (finite float32 can still overflow float16): a float64 sum
      # of finite float16 values is finite, and one infinite or NaN value makes it not, so the frames need no
      # separate pass.
      as_float = stored.astype(np.float64)
      clip_sum, clip_sum_sq = as_float.sum(axis=0), np.einsum('ij,ij->j', as_float, as_float)
      if not (np.all(np.isfinite(clip_sum)) and np.all(np.isfinite(clip_sum_sq))):
        bad = np.count_nonzero(~np.isfinite(stored).all(axis=1))
        raise audio.AudioError(path, f'{bad} of its {stored.shape[0]} log-Mel frames are not finite (samples up to '
                                     f'{float(np.max(np.abs(samples))):.3g}; float audio is expected in [-1, 1]); '
                                     'not stored')
    except audio.AudioError as e:
      result['failure'] = e.reason
      results.append(result)
      continue
    if warnings:
      result['warning'] = '; '.join(warnings)
    start = clip['frame_offset'] - block['frame_start']
    buffer[start:start + stored.shape[0]] = stored
    result.update(num_frames=int(stored.shape[0]), duration=float(samples.shape[0] / frontend.sample_rate))
    results.append(result)
    s = sums.setdefault(clip['split'], {'count': 0, 'sum': np.zeros(frontend.n_mels),
                                        'sum_sq': np.zeros(frontend.n_mels)})
    s['count'] += stored.shape[0]
    s['sum'] += clip_sum
    s['sum_sq'] += clip_sum_sq
  used = max((clip['frame_offset'] - block['frame_start'] + r['num_frames']
              for clip, r in zip(plan['clips'][first:last], results)), default=0)
  if used:
    array[block['frame_start']:block['frame_start'] + used].write(buffer[:used]).result()
  marker = {'block': index, 'clips': results,
            'sums': {k: {'count': v['count'], 'sum': v['sum'].tolist(), 'sum_sq': v['sum_sq'].tolist()}
                     for k, v in sums.items()}}
  _atomic_write_json(_block_marker(output_dir, index), marker)
  return marker


class _Progress:
  """tqdm on a terminal (clips/s, audio hours, ETA); a log line every 30 s otherwise."""

  def __init__(self, total_clips: int, done_clips: int):
    self.interactive = sys.stderr.isatty()
    self.total, self.done, self.initial = total_clips, done_clips, done_clips
    self.hours, self.start, self.last_log = 0.0, time.time(), 0.0
    self.bar = tqdm.tqdm(total=total_clips, initial=done_clips, unit='clip', dynamic_ncols=True,
                         disable=not self.interactive)

  def update(self, clips: int, seconds: float) -> None:
    self.done += clips
    self.hours += seconds / 3600
    self.bar.update(clips)
    self.bar.set_postfix_str(f'{self.hours:.2f} h of audio', refresh=False)
    now = time.time()
    if not self.interactive and (now - self.last_log > 30 or self.done == self.total):
      self.last_log = now
      rate = (self.done - self.initial) / max(now - self.start, 1e-9)
      eta = (self.total - self.done) / rate if rate > 0 else float('inf')
      logging.info('preprocess: %d/%d clips, %.2f h of audio, %.1f clips/s, ETA %.0f s', self.done, self.total,
                   self.hours, rate, eta)

  def close(self) -> None:
    self.bar.close()


def _die_with_parent(parent_pid: int) -> None:
  """End this worker when `parent_pid` ends, even by kill -9, so that no orphan keeps computing."""
  if sys.platform.startswith('linux'):
    try:  # The kernel's way: SIGKILL to this process when its parent dies (PR_SET_PDEATHSIG = 1).
      ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
      pass
  # Everywhere (and for a parent that died before the line above): a watchdog that sees the parent change.
  def watch():
    while os.getppid() == parent_pid:
      time.sleep(0.5)
    os._exit(1)
  threading.Thread(target=watch, name='die-with-parent', daemon=True).start()


def usable_cores() -> int:
  """The cores this process may run on (its affinity mask: a cluster job's share, not the whole machine)."""
  return len(os.sched_getaffinity(0))


def blas_threads_per_worker(num_workers: int, cores: int | None = None) -> int:
  """BLAS threads for each of `num_workers` processes so that together they use the cores once: the workers
  already fill the cores, and threads beyond that only contend (a BLAS thread spin-waits; docs/benchmarks.md has
  the figures)."""
  return max(1, (cores or usable_cores()) // num_workers)


def _start_worker(parent_pid: int, blas_threads: int, frontend: dict) -> None:
  _die_with_parent(parent_pid)
  threadpoolctl.threadpool_limits(blas_threads)
  # The first log-Mel builds the window and filterbank (and loads the FFT's code): done here, while the parent plans,
  # rather than on the first block.
  log_mel(np.zeros(frontend['win_length'], np.float32), FrontEnd(**frontend))


def _blocks_with_workers(pool: concurrent.futures.Executor, pool_workers: int, output_dir: str, plan_path: str,
                         todo: list[int]):
  """Markers of the blocks in `todo` as they finish, done by the pool's workers and by this process.

  This process is a worker too: it does blocks from the end of the list while the pool's workers take them from the
  front. A fresh worker takes a while to start (an interpreter, the imports, the filterbank), in which this process,
  with everything loaded, already works; a small data set is done in that time. The pool holds two blocks
  per worker, so that a worker that finishes while this process is busy finds the next one.
  """
  waiting = collections.deque(todo)
  running = set()
  while waiting or running:
    while waiting and len(running) < 2 * pool_workers:
      running.add(pool.submit(_process_block, output_dir, plan_path, waiting.popleft()))
    if waiting:
      yield _process_block(output_dir, plan_path, waiting.pop())
      done = {f for f in running if f.done()}
    else:
      done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
    running -= done
    yield from (f.result() for f in done)


def run_task(output_dir: str, settings: dict, *, task_index: int = 0, num_tasks: int = 1, num_workers: int = 1
             ) -> dict:
  """Process this task's blocks that are not done yet; returns {'blocks_done', 'blocks_total', 'wall_seconds'}."""
  start = time.time()
  output_dir = os.path.abspath(output_dir)
  prepare_output_dir(output_dir)
  pool = None
  blas_threads = blas_threads_per_worker(num_workers)
  if num_workers > 1:
    # This process is one of the `num_workers`; the others are started processes. spawn, not fork: tensorstore and
    # BLAS keep threads that a fork would copy in a broken state. They start now, so that their imports overlap
    # with planning.
    pool = concurrent.futures.ProcessPoolExecutor(num_workers - 1, mp_context=multiprocessing.get_context('spawn'),
                                                  initializer=_start_worker,
                                                  initargs=(os.getpid(), blas_threads, settings['frontend']))
    for _ in range(num_workers - 1):
      pool.submit(int)
  try:
    plan = load_or_make_plan(output_dir, settings)
    plan_path = os.path.join(output_dir, WORK_DIR, PLAN_NAME)
    mine = task_blocks(len(plan['blocks']), task_index, num_tasks)
    todo = [b for b in mine if not os.path.exists(_block_marker(output_dir, b))]
    clip_count = lambda b: plan['blocks'][b]['clips'][1] - plan['blocks'][b]['clips'][0]
    total_clips = sum(clip_count(b) for b in mine)
    logging.info('preprocess: task %d/%d, %d of its %d blocks to do (%d clips in all), %d worker(s)', task_index,
                 num_tasks, len(todo), len(mine), total_clips, num_workers)
    progress = _Progress(total_clips, total_clips - sum(clip_count(b) for b in todo))
    try:
      with threadpoolctl.threadpool_limits(blas_threads):  # for the blocks this process does itself
        if pool is None:
          markers = (_process_block(output_dir, plan_path, b) for b in todo)
        else:
          markers = _blocks_with_workers(pool, num_workers - 1, output_dir, plan_path, todo)
        for marker in markers:
          progress.update(len(marker['clips']), sum(c['duration'] for c in marker['clips']))
    finally:
      progress.close()
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)
  wall = time.time() - start
  _atomic_write_json(os.path.join(output_dir, WORK_DIR, 'tasks', f'task-{task_index:05d}-of-{num_tasks:05d}.json'),
                     {'blocks': [mine.start, mine.stop], 'wall_seconds': wall})
  return {'blocks_done': len(todo), 'blocks_total': len(mine), 'wall_seconds': wall}


def finalize(output_dir: str, *, wall_seconds: float | None = None) -> dict:
  """Assemble manifest, statistics, summary and features.json from the done markers; returns the summary."""
  output_dir = os.path.abspath(output_dir)
  plan_path = os.path.join(output_dir, WORK_DIR, PLAN_NAME)
  if not os.path.exists(plan_path):
    raise PreprocessError(f'{output_dir} holds no preprocessing run to finalize; run the job (without --finalize) '
                          'first.')
  plan = _read_json(plan_path)
  missing = [b for b in range(len(plan['blocks'])) if not os.path.exists(_block_marker(output_dir, b))]
  if missing:
    raise PreprocessError(f'{len(missing)} of {len(plan["blocks"])} blocks are not done yet (first: block '
                          f'{missing[0]}). Run the tasks that have not finished (the same command finishes what '
                          'is left), then --finalize again.')
  settings = plan['settings']
  n_mels = settings['frontend']['n_mels']
  clips, failures, sums = [], list(plan['problems']), {}
  warnings = [{'path': settings['data_dir'], 'reason': w} for w in plan.get('warnings', [])]
  for b, block in enumerate(plan['blocks']):
    marker = _read_json(_block_marker(output_dir, b), _REDO_BLOCK)
    first, last = block['clips']
    for clip, result in zip(plan['clips'][first:last], marker['clips']):
      if 'warning' in result:
        warnings.append({'path': clip['path'], 'reason': result['warning']})
      if 'failure' in result:
        failures.append({'path': clip['path'], 'reason': result['failure']})
        continue
      clips.append(features_lib.Clip(
          clip_id=clip['clip_id'], path=clip['path'], label=clip['label'], group=clip['group'],
          recording=clip['recording'], position=clip['position'], split=clip['split'],
          frame_offset=clip['frame_offset'], num_frames=result['num_frames'], duration=result['duration'],
          extra=tuple(tuple(kv) for kv in clip['extra'])))
    for split, s in marker['sums'].items():
      if not (np.isfinite(s['count']) and np.all(np.isfinite(s['sum'])) and np.all(np.isfinite(s['sum_sq']))):
        raise PreprocessError(f'{_block_marker(output_dir, b)} holds non-finite band sums; delete that file and '
                              'run the job again to redo its block.')
      acc = sums.setdefault(split, {'count': 0, 'sum': np.zeros(n_mels), 'sum_sq': np.zeros(n_mels)})
      acc['count'] += s['count']
      acc['sum'] += np.asarray(s['sum'])
      acc['sum_sq'] += np.asarray(s['sum_sq'])
  task_walls = [_read_json(os.path.join(output_dir, WORK_DIR, 'tasks', f), _REDO_TASK_RECORD)['wall_seconds']
                for f in sorted(os.listdir(os.path.join(output_dir, WORK_DIR, 'tasks')))]
  summary = {
      'clips_written': len(clips),
      'clips_planned': len(plan['clips']),
      'failures': failures,
      'warnings': warnings,
      'audio_seconds': float(sum(c.duration for c in clips)),
      'wall_seconds': float(wall_seconds if wall_seconds is not None else sum(task_walls)),
      'task_wall_seconds': task_walls,
      'settings': settings,
  }
  _atomic_write_json(os.path.join(output_dir, features_lib.SUMMARY_NAME), summary)
  if not clips:
    return summary
  manifest_path = os.path.join(output_dir, features_lib.MANIFEST_NAME)
  features_lib.write_manifest(manifest_path, clips)
  band_sums = {k: {'count': v['count'], 'sum': v['sum'].tolist(), 'sum_sq': v['sum_sq'].tolist()}
               for k, v in sorted(sums.items())}
  info = {
      'dataset': settings['dataset'],
      'data_dir': settings['data_dir'],
      'frontend': settings['frontend'],
      'storage': settings['storage'],
      'trim_top_db': settings['trim_top_db'],
      'labels': plan['labels'],
      'total_frames': plan['total_frames'],
      'band_sums': band_sums,
      'num_clips': len(clips),
      'manifest_sha256': _sha256(manifest_path),
      'store_files': features_lib.store_files(output_dir),
  }
  # The training part's statistics ready-made, so that other tools need not know how splits combine.
  train = features_lib.training_splits(band_sums)
  if train:
    mean, std = features_lib.stats_from_sums(sum(sums[s]['count'] for s in train),
                                             sum(sums[s]['sum'] for s in train),
                                             sum(sums[s]['sum_sq'] for s in train))
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
      raise PreprocessError(f'The band statistics of {output_dir} are not finite; delete the folder and run the job '
                            'again.')
    info['norm_stats'] = {'splits': train, 'mean': mean.tolist(), 'std': std.tolist()}
  _atomic_write_json(os.path.join(output_dir, features_lib.INFO_NAME), info)
  return summary


def run(config, *, dataset: str, data_dir: str, output_dir: str, split_file: str | None = None, num_workers: int = 1,
        task_index: int = 0, num_tasks: int = 1, finalize_only: bool = False) -> dict | None:
  """The whole job as the command line runs it; returns the summary when it finalized, else None.

  Errors that stop the job are PreprocessError or DatasetError, each with a message that names the file or setting
  and the fix; an operating-system error (disk full, permissions) becomes a PreprocessError saying that the same
  command finishes the job once it is fixed.
  """
  start = time.time()
  if not finalize_only and not (num_tasks >= 1 and 0 <= task_index < num_tasks):
    raise PreprocessError(f'--task_index={task_index} must lie in [0, --num_tasks={num_tasks}) and --num_tasks be 1 '
                          'or more; nothing was written.')
  if '://' in output_dir:  # Its locks, markers and renames need a local file system; training reads URLs.
    raise PreprocessError(f'--output_dir={output_dir}: preprocessing writes to a local folder only. Write there, then '
                          'copy the finished folder (all of it) to where training reads it (gs://, s3://, '
                          'http(s)://); nothing was written.')
  created = not os.path.lexists(output_dir)
  try:
    try:
      if finalize_only:
        return finalize(output_dir)
      settings = settings_from_config(config, dataset, data_dir, split_file)
      run_task(output_dir, settings, task_index=task_index, num_tasks=num_tasks, num_workers=num_workers)
      if num_tasks == 1:
        return finalize(output_dir, wall_seconds=time.time() - start)
    except OSError as e:
      where = e.filename or output_dir
      raise PreprocessError(f'{where}: {e.strerror or e}. Fix that (free space, permissions), then run the same '
                            'command again: it finishes what is left.') from None
  except BaseException:
    # A run refused before it made its plan (a bad --data_dir, a list that cannot be read) leaves no folder behind.
    if created and os.path.isdir(output_dir) and not os.path.exists(os.path.join(output_dir, WORK_DIR, PLAN_NAME)):
      shutil.rmtree(output_dir, ignore_errors=True)
    raise
  logging.info('preprocess: task %d of %d done; when all tasks are, run with --finalize.', task_index, num_tasks)
  return None
