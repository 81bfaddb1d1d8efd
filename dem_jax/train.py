r"""Triplet training of the embedding: `train_and_evaluate(config, workdir)` and its command line.

    ./launch.sh train --config=configs/dcase.py --workdir=/scratch/dcase_run \
        --config.features_dir=/data/features/dcase_dev [--config.parallel=pmap] [--distributed]

The trainer reads top to bottom: data (the split packed into float16 and placed on the devices, or streamed from
host memory), model, state (fresh or resumed from the workdir), the compiled loop of several steps, and the loop
itself, whose boundaries (logs, evaluations, checkpoints, the time budget) fall between compiled calls. A resumed
run sees the same batches and dropout masks as an uninterrupted run: both are functions of the seed and the step.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import itertools
import json
import logging
import math
import os
import socket
import time

import jax
import numpy as np

from dem_jax import augment as augment_lib
from dem_jax import checkpoint as checkpoint_lib
from dem_jax import input_pipeline
from dem_jax import losses
from dem_jax import models
from dem_jax import probes
from dem_jax import streaming
from dem_jax import train_step as step_lib
from dem_jax.embed import embed_clips, TileEmbedder
from dem_jax.features import FeaturesError, open_features
from dem_jax.metric_writer import MetricWriter, read_metrics
from dem_jax.parallel import DataParallel
from dem_jax.sampler import SamplerError, TripletSampler

# model.json keys that must not change when a run resumes (num_steps, the budget and the schedule may).
FINGERPRINT_KEYS = ('model', 'tile_frames', 'frontend', 'features_dir', 'features_digest', 'fold')
LOCK_NAME = '.lock'  # In the workdir: held by the one run that writes there.


class TrainingError(RuntimeError):
  """Training cannot go on; the message names the cause and the fix."""


def _select(features, config):
  """(train clips, held-out clips) for the configured fold or split (checked by _check_settings)."""
  fold = config.data.fold or None
  train = features.select(features.train_splits(fold))
  held_out = []
  if features.folds():
    if fold is not None:
      held_out = features.select(features.test_splits(fold))
  else:
    test = [s for s in features.test_splits() if s not in features.train_splits()]
    held_out = features.select(test)
  return train, held_out


def _features_digest(features) -> str:
  """What identifies the data a run trains on: its features.json (settings, clips' statistics)."""
  return hashlib.sha256(features.info_bytes).hexdigest()[:16]


def _fingerprint(config, features) -> dict:
  """The FINGERPRINT_KEYS of model.json: the model and the data it is trained on."""
  return {'model': config.model.to_dict(),
          'tile_frames': features.frontend.frames_for_seconds(config.data.tile_seconds),
          'frontend': dict(vars(features.frontend)), 'features_dir': features.root,
          'features_digest': _features_digest(features), 'fold': config.data.fold}


_MISSING = object()


def _differences(saved, now, name: str) -> list[str]:
  """'name.field: <saved> in the workdir, <now> now' for each field that differs, nested dicts followed down to
  the fields themselves (a dict shown whole would be cut before the field that differs)."""
  if isinstance(saved, dict) and isinstance(now, dict):
    return [line for key in sorted(set(saved) | set(now))
            for line in _differences(saved.get(key, _MISSING), now.get(key, _MISSING), f'{name}.{key}')]
  if saved == now:
    return []

  def show(value) -> str:
    text = 'nothing' if value is _MISSING else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + '...'
  return [f'{name}: {show(saved)} in the workdir, {show(now)} now']


def _check_fingerprint(workdir: str, info: dict) -> None:
  """A resumed run must train the same model on the same features as the run that wrote the workdir."""
  try:
    saved = checkpoint_lib.read_model_info(workdir)
  except FileNotFoundError:
    return
  info = json.loads(json.dumps(info))  # As model.json holds it (tuples as lists).
  changed = [k for k in FINGERPRINT_KEYS if k in saved and saved[k] != info[k]]
  if changed:
    details = '; '.join(line for k in changed for line in _differences(saved[k], info[k], k))
    raise TrainingError(f'{workdir} holds a run of another {"/".join(changed)} ({details}). Use a new --workdir, or '
                        'the settings it was started with; nothing in it was changed.')


def _check_settings(config, workdir: str):
  """Every check of the run's settings, made before the run writes anything, so that a bad setting fails with its
  fix and leaves the workdir as it was. Opens the features only as far as the checks need, and returns them."""
  _check_numbers(config)
  if not config.features_dir:
    raise TrainingError('config.features_dir is empty: point it at a preprocessing output with '
                        '--config.features_dir=DIR (see dem-jax preprocess).')
  try:
    features = open_features(config.features_dir)
  except FeaturesError as e:
    raise TrainingError(str(e)) from None
  if not features.clips:
    raise TrainingError(f'{config.features_dir} holds no clips.')
  devices = jax.device_count()
  if config.batch_size % devices:
    fits = devices * max(1, config.batch_size // devices)
    raise TrainingError(f'config.batch_size={config.batch_size} does not divide across {devices} devices; use a '
                        f'multiple of {devices} (e.g. --config.batch_size={fits}).')
  train_minutes = float(config.get('train_minutes', 0.0))
  if not (math.isfinite(train_minutes) and train_minutes >= 0):  # nan fails every comparison, `< 0` included.
    raise TrainingError(f'config.train_minutes={train_minutes} must be a finite number of minutes >= 0 (0: no time '
                        'budget); set --config.train_minutes=0 or the minutes to train.')
  k = int(config.get('steps_per_dispatch', 0))
  if k < 0:
    raise TrainingError(f'config.steps_per_dispatch={k} must be >= 0 (0: 1 on CPU, 16 on GPU/TPU).')
  fold = config.data.fold or None
  if features.folds() and fold is not None and fold not in features.folds():
    raise TrainingError(f'config.data.fold={fold}, but {features.root} has folds {features.folds()}; pick one of '
                        'them, or 0 to train on all.')
  if not features.select(features.train_splits(fold)):
    raise TrainingError(f'No training clips in {config.features_dir} for config.data.fold={config.data.fold}.')
  try:
    augment_lib.make_augment(**config.data.get('augment', {}), frame_rate=features.frame_rate)
  except ValueError as e:
    raise TrainingError(str(e)) from None
  except TypeError as e:
    raise TrainingError(f'config.data.augment holds an unknown setting ({e}); it takes '
                        f'{", ".join(augment_lib.SETTINGS[:-1])} and {augment_lib.SETTINGS[-1]}.') from None
  try:  # The schedule is otherwise first read at the first step, after the run has written its files.
    step_lib.learning_rate_at(config.optimizer, 0, total_steps=1)
  except ValueError as e:
    raise TrainingError(str(e)) from None
  _check_fingerprint(workdir, _fingerprint(config, features))
  return features


def _check_numbers(config) -> None:
  """Numeric settings outside their range, refused one at a time with the range and the default as an example.
  Each rule states what a good value satisfies, so that NaN, which fails every comparison, is refused too."""
  def within(low, high, *, low_open=False, high_open=False):
    def ok(value):
      try:
        v = float(value)
      except (TypeError, ValueError):
        return False
      return (math.isfinite(v) and (v > low if low_open else v >= low)
              and (high is None or (v < high if high_open else v <= high)))
    return ok

  positive, non_negative, fraction = within(0, None, low_open=True), within(0, None), within(0, 1)
  o, d, loss = config.optimizer, config.data, config.loss
  rules = [  # (setting, value, ok, what it must be, an example)
      ('optimizer.learning_rate', o.learning_rate, positive, 'a finite number > 0', '1e-4'),
      ('optimizer.decay_rate', o.decay_rate, within(0, 1, low_open=True), 'in (0, 1]', '0.95'),
      ('optimizer.decay_steps', o.decay_steps, positive, '>= 1', '7500'),
      ('optimizer.warmup_steps', o.get('warmup_steps', 0), non_negative, '>= 0', '0'),
      ('optimizer.final_fraction', o.get('final_fraction', 0.0), fraction, 'in [0, 1]', '0.0'),
      ('optimizer.schedule_steps', o.get('schedule_steps', 0), non_negative, '>= 0 (0: the run\'s length)', '0'),
      ('optimizer.weight_decay', o.weight_decay, non_negative, 'a finite number >= 0 (0: off)', '1e-4'),
      ('optimizer.grad_clip_norm', o.grad_clip_norm, non_negative, 'a finite number >= 0 (0: off)', '0.0'),
      ('loss.margin', loss.get('margin', 1.0), positive, 'a finite number > 0', '1.0'),
      ('loss.l2', loss.get('l2', 0.0), non_negative, 'a finite number >= 0', '0.01'),
      ('loss.temperature', loss.get('temperature', 0.1), positive, 'a finite number > 0', '0.1'),
      ('loss.debias', loss.get('debias', 0.0), within(0, 1, high_open=True), 'in [0, 1)', '0.0'),
      ('batch_size', config.batch_size, positive, '>= 1', '64'),
      ('num_steps', config.num_steps, non_negative, '>= 0 (0: config.num_epochs decides)', '1000'),
      ('num_epochs', config.num_epochs, non_negative, '>= 0', '20'),
      ('log_every', config.log_every, positive, '>= 1', '50'),
      ('eval_every', config.eval_every, non_negative, '>= 0 (0: once per epoch)', '0'),
      ('checkpoint_every', config.checkpoint_every, positive, '>= 1', '1000'),
      ('keep_checkpoints', config.keep_checkpoints, positive, '>= 1', '3'),
      ('data.tile_seconds', d.tile_seconds, positive, 'a finite number of seconds > 0', '5.0'),
      ('data.neighbour_seconds', d.neighbour_seconds, non_negative, 'a finite number of seconds >= 0', '5.0'),
      ('data.eval_batches', d.eval_batches, non_negative, '>= 0', '4'),
      ('data.eval_max_clips', d.eval_max_clips, non_negative, '>= 0', '400'),
      ('data.device_memory_fraction', d.get('device_memory_fraction', 0.5), within(0, 1, low_open=True),
       'in (0, 1]', '0.5'),
      ('data.host_memory_fraction', d.get('host_memory_fraction', 0.5), within(0, 1, low_open=True), 'in (0, 1]',
       '0.5'),
      ('data.resident_gb', d.get('resident_gb', 4.0), positive, 'a finite number of GB > 0', '4.0'),
  ]
  for name, value, ok, must, example in rules:
    if not ok(value):
      raise TrainingError(f'config.{name}={value} must be {must}; set --config.{name} to such a value (e.g. '
                          f'--config.{name}={example}).')
  if not config.num_steps and not config.num_epochs:
    raise TrainingError('config.num_steps=0 and config.num_epochs=0 leave nothing to train; set '
                        '--config.num_steps=N (or --config.num_epochs=N).')


def _steps_per_dispatch(config) -> int:
  return int(config.get('steps_per_dispatch', 0)) or (1 if jax.default_backend() == 'cpu' else 16)


def _dispatches(start: int, stop: int, size: int, boundaries: list[int]):
  """(first step, steps) of each compiled call from `start` to `stop`: at most `size` steps, never across a
  multiple of any of `boundaries` (logs, evaluations, checkpoints)."""
  step = start
  while step < stop:
    nxt = min([stop] + [(step // b + 1) * b for b in boundaries if b > 0])
    n = min(size, nxt - step)
    yield step, n
    step += n


class _Lookahead:
  """Iterates (item, [the next `ahead` items]) over an iterable without materialising it (runs may be long)."""

  def __init__(self, items, ahead: int):
    self._items, self._ahead = iter(items), ahead

  def __iter__(self):
    window = collections.deque(itertools.islice(self._items, self._ahead + 1))
    while window:
      current = window.popleft()
      yield current, list(window)
      window.extend(itertools.islice(self._items, 1))


def _progress_from_log(workdir: str, step: int) -> dict | None:
  """The progress of a checkpoint saved without one (by an older dem_jax), from metrics.jsonl: None unless the log
  holds the clock record written with that checkpoint, at its step."""
  try:
    records = [r for r in read_metrics(workdir) if r['step'] <= step]
  except (FileNotFoundError, ValueError):
    return None
  clock = [r['train/train_seconds'] for r in records if r['step'] == step and 'train/train_seconds' in r]
  schedule = [r['train/schedule_steps'] for r in records if 'train/schedule_steps' in r]
  if not clock:
    return None
  return {'train_seconds': float(clock[-1]), 'schedule_steps': int(schedule[-1]) if schedule else None}


def _lock_workdir(workdir: str):
  """Makes this process the workdir's one writer: an exclusive flock on WORKDIR/.lock, which names this host and
  pid, held until the returned file is closed. The kernel drops a flock when its process ends, however it ends, so
  the lock file a killed run left behind is simply taken over. A second run is refused, naming the holder."""
  os.makedirs(workdir, exist_ok=True)
  lock = open(os.path.join(workdir, LOCK_NAME), 'a+', encoding='utf-8')
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    lock.seek(0)
    holder = lock.read().strip() or 'a process that has not yet written its name'
    lock.close()
    raise TrainingError(f'{workdir} is in use by another dem-jax train ({holder}). Wait for it to end (or stop it), '
                        'or train in another --workdir.') from None
  except OSError as e:  # A file system without locks (some network mounts): train unguarded rather than not at all.
    logging.warning('Cannot lock %s (%s): a second dem-jax train there would not be refused.', lock.name, e)
    return lock
  lock.seek(0)
  lock.truncate()
  lock.write(f'host {socket.gethostname()}, pid {os.getpid()}\n')
  lock.flush()
  return lock


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains for config.num_steps (or num_epochs, or config.train_minutes) steps; returns the last logged metrics."""
  workdir = os.path.abspath(workdir)
  features = _check_settings(config, workdir)
  # One writer per workdir, locked before anything is written. With several processes process 0 holds it (the
  # others write only their part of the checkpoints), and all of them stop when it is refused.
  lock, refusal = None, None
  if jax.process_index() == 0:
    try:
      lock = _lock_workdir(workdir)
    except TrainingError as e:
      refusal = e
  if not _agreed(refusal is None):
    raise refusal or TrainingError(f'Process 0 could not lock {workdir}: its message names the run that holds it.')
  try:
    return _train(config, workdir, features)
  finally:
    if lock is not None:
      lock.close()


def _train(config, workdir: str, features) -> dict:
  """train_and_evaluate's run, in a workdir whose lock process 0 holds."""
  is_chief = jax.process_index() == 0

  # ---- Data -------------------------------------------------------------------------------------------------
  parallel = DataParallel(config.parallel)
  devices = jax.device_count()
  budget_s = 60.0 * float(config.get('train_minutes', 0.0))

  tile_frames = features.frontend.frames_for_seconds(config.data.tile_seconds)
  neighbour_frames = int(round(config.data.neighbour_seconds * features.frame_rate))
  train_clips, held_out_clips = _select(features, config)
  sampler_args = dict(tile_frames=tile_frames, neighbour_frames=neighbour_frames,
                      cross_clip_neighbours=config.data.cross_clip_neighbours,
                      distant_other_group=config.data.distant_other_group)
  sampler = TripletSampler(train_clips, seed=config.seed, **sampler_args)
  if sampler.skipped:
    logging.warning('%d training clips are shorter than a tile (%d frames) and are not used, e.g. %s',
                    len(sampler.skipped), tile_frames, sampler.skipped[:3])
  eval_sampler = None
  if held_out_clips:
    try:
      eval_sampler = TripletSampler(held_out_clips, seed=config.seed + 1, **sampler_args)
    except SamplerError as e:
      logging.warning('No held-out triplet loss: %s', e)
  steps_per_epoch = sampler.steps_per_epoch(config.batch_size)
  num_steps = config.num_steps or config.num_epochs * steps_per_epoch
  eval_every = config.eval_every or steps_per_epoch
  steps_per_call = _steps_per_dispatch(config)

  t0 = time.time()
  store, sizes = input_pipeline.choose_store(config.data.store, sampler.total_frames * features.n_mels * 2,
                                             parallel.local_devices, config.data.device_memory_fraction,
                                             config.data.get('host_memory_fraction', 1.0))
  packed = None if store == 'stream' else input_pipeline.pack_timelines(features, sampler)
  logging.info('%s the training split in %.1f s: %s store (config.data.store=%r): %s.',
               'Indexed' if packed is None else 'Packed', time.time() - t0, store, config.data.store, sizes)

  # ---- Model ------------------------------------------------------------------------------------------------
  band_mean, band_std = features.norm_stats(features.train_splits(config.data.fold or None))
  if not (np.all(np.isfinite(band_mean)) and np.all(np.isfinite(band_std))):
    raise TrainingError(f'The band statistics in {features.root}/features.json are not finite; the store holds '
                        'non-finite frames. Preprocess the data again with a current dem_jax, which refuses them.')
  band_std = np.maximum(band_std, 1e-3)  # A band that never changes (e.g. above a low-pass) must not divide by 0.
  model = models.create_model(config.model, band_mean=band_mean, band_std=band_std, axis_name=parallel.axis_name)
  optimizer = step_lib.make_optimizer(config.optimizer)
  loss_fn = losses.get_loss_fn(config.loss.name, **{k: v for k, v in config.loss.items() if k != 'name'})
  augment = augment_lib.make_augment(**config.data.get('augment', {}), frame_rate=features.frame_rate)
  model_info = _fingerprint(config, features) | {
      'band_mean': band_mean.tolist(), 'band_std': band_std.tolist(), 'tile_seconds': config.data.tile_seconds,
      'labels': features.labels, 'dataset': features.dataset}

  # ---- State ------------------------------------------------------------------------------------------------
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  state = step_lib.create_train_state(init_rng, model, optimizer, (tile_frames, features.n_mels))
  checkpointer = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.keep_checkpoints,
                                             save_every=config.checkpoint_every)
  # The trainer's own state beside the arrays: the budget's clock and the schedule's length (None: the run's).
  start_step, spent_s, saved_schedule = 0, 0.0, None
  if checkpointer.all_steps():
    try:  # The newest intact step: a damaged one is skipped with a warning.
      state = checkpointer.restore(state)
      start_step = int(state.step)
      progress = checkpointer.progress(start_step)
    except checkpoint_lib.CheckpointError as e:
      raise TrainingError(str(e)) from None
    except (ValueError, KeyError) as e:
      raise TrainingError(f'The newest checkpoint in {checkpointer.directory} does not fit this model ({e}); use a '
                          'new --workdir.') from None
    if progress is None:
      # Saved by an older dem_jax. The careful fallback: the log only where it holds the clock record written with
      # this checkpoint, since a log cut short or lost would silently restart the budget and resize the schedule.
      progress = _progress_from_log(workdir, start_step)
    if progress is None and budget_s:
      raise TrainingError(f'The checkpoint of step {start_step} in {checkpointer.directory} was saved without the '
                          'time budget\'s clock, and metrics.jsonl has no record of that step to take it from. Run '
                          'dem-jax train with --config.train_minutes=0 to go on without a budget (to '
                          'config.num_steps), or in a new --workdir.')
    if progress is None:
      logging.warning('The checkpoint of step %d was saved without the training clock, and metrics.jsonl does not '
                      'reach it: the clock restarts at 0 s.', start_step)
    else:
      spent_s, saved_schedule = float(progress['train_seconds']), progress['schedule_steps']
    if budget_s and spent_s >= budget_s and start_step < num_steps:
      raise TrainingError(f'The time budget (config.train_minutes={config.train_minutes}) is spent: this run trained '
                          f'{spent_s / 60:.1f} min to step {start_step}. Raise config.train_minutes, or set it to 0 '
                          f'to train on to config.num_steps={num_steps}.')
    checkpointer.set_aside_after(start_step)  # Damaged later steps: kept aside, so training can save them anew.
    logging.info('Resumed from the checkpoint of step %d in %s.', start_step, checkpointer.directory)

  # ---- Step -------------------------------------------------------------------------------------------------
  train_step = step_lib.make_train_step(model, optimizer, loss_fn, axis_name=parallel.axis_name, guard=False,
                                        augment=augment)
  if store == 'device':
    batch_fn = input_pipeline.device_batch_fn(parallel, batch_size=config.batch_size, tile_frames=tile_frames,
                                              neighbour_frames=neighbour_frames)
    data = parallel.put_replicated((packed, sampler.tables, sampler.data_key))
    loader = None
    del packed  # The devices hold it now (CPU devices share this memory with the host and keep it).
  elif store == 'stream':  # Reads the window of start_step only, so a resumed run re-reads nothing before it.
    loader = streaming.StreamStore(features, sampler, parallel, global_batch=config.batch_size,
                                   steps_per_call=steps_per_call, steps_per_epoch=steps_per_epoch,
                                   resident_gb=config.data.resident_gb, start_step=start_step, seed=config.seed,
                                   device_fraction=config.data.device_memory_fraction)
    batch_fn, data = loader.batch_fn, loader.data
    logging.info('Streaming the training split: %s; the first window read in %.1f s.', loader.describe(),
                 loader.first_window_seconds)
  else:
    batch_fn = input_pipeline.host_batch_fn
    loader = input_pipeline.HostTileLoader(packed, sampler, config.batch_size, steps_per_call,
                                           put=parallel.put_host_batches,
                                           share=input_pipeline.Share(jax.process_index(), jax.process_count()))
    data = None
  data_layout = loader.data_layout if store == 'stream' else {'data_sharded': store == 'host'}
  loop = parallel.compile_train_loop(step_lib.make_train_loop(train_step, batch_fn), **data_layout)
  eval_step = parallel.compile_eval_step(step_lib.make_eval_step(model, loss_fn, axis_name=parallel.axis_name))
  device_state = parallel.put_state(state)
  rng = parallel.put_replicated(dropout_rng)
  zero_metrics = step_lib.init_loop_metrics(loss_fn, config.model.embedding_dim)
  acc = parallel.put_replicated(zero_metrics)
  num_placed = {}

  def placed_count(n):
    if n not in num_placed:
      num_placed[n] = parallel.put_replicated(np.int32(n))
    return num_placed[n]

  eval_batches = []
  if eval_sampler is not None:  # Read tile by tile: the held-out split is never packed.
    share = input_pipeline.Share(jax.process_index(), jax.process_count())
    eval_batches = [parallel.put_batch(input_pipeline.read_batch(features, eval_sampler, i, config.batch_size, share))
                    for i in range(config.data.eval_batches)]
  silhouette_clips = [c for c in held_out_clips if c.label and c.num_frames >= tile_frames]
  silhouette_clips = silhouette_clips[:config.data.eval_max_clips]

  # Compiled ahead of the loop, so that the time budget counts training, not compilation. (pmap across several
  # processes cannot be compiled ahead from local arrays; there the clock starts after the first call instead.)
  precompiled = parallel.mode == 'jit' or jax.process_count() == 1
  if precompiled:
    t0 = time.time()
    example_data = data if data is not None else parallel.put_host_batches(
        {r: np.zeros((steps_per_call, config.batch_size // jax.process_count(), tile_frames, features.n_mels),
                     np.float16) for r in step_lib.ROLES})
    lrs = parallel.put_replicated(np.zeros(steps_per_call, np.float32))
    loop = loop.lower(device_state, acc, example_data, lrs, rng, placed_count(1)).compile()
    if eval_batches:
      eval_step = eval_step.lower(device_state, eval_batches[0]).compile()
    logging.info('Compiled the training loop (%d steps per call) in %.1f s.', steps_per_call, time.time() - t0)
    if budget_s:
      # One step on a copy of the state (the loop donates it), so that a budget too short for a single step fails
      # here, before any file is written, instead of training one call and stopping.
      t0 = time.time()
      jax.block_until_ready(loop(parallel.put_state(state), parallel.put_replicated(zero_metrics), example_data,
                                 lrs, rng, placed_count(1)))
      step_s = time.time() - t0
      if budget_s - spent_s < step_s:
        left = f'{(budget_s - spent_s) / 60:.4g} min left of ' if spent_s else ''
        raise TrainingError(
            f'config.train_minutes={config.train_minutes} ({left}{budget_s:.3g} s) is shorter than one training '
            f'step here ({step_s:.3g} s at batch {config.batch_size}). Raise it (a useful run takes thousands of '
            f'steps; --config.train_minutes={math.ceil(1000 * step_s / 60)} buys about 1000 here), or set it to 0 '
            'and bound the run with config.num_steps.')

  # ---- Loop -------------------------------------------------------------------------------------------------
  writer = MetricWriter(workdir, enabled=is_chief, purge_step=start_step)
  writer.write_hparams(_hparams(config), metrics={'train/loss': float('nan'), 'eval/loss': float('nan')})
  embedder = None

  def evaluate(state_on_device) -> dict:
    nonlocal embedder
    metrics = {}
    if eval_batches:
      values = [parallel.get_metrics(eval_step(state_on_device, b)) for b in eval_batches]
      metrics = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
    if len({c.label for c in silhouette_clips}) >= 2 and is_chief:
      host_state = parallel.get_state(state_on_device)
      variables = {'params': host_state.params, 'batch_stats': host_state.batch_stats}
      if embedder is None:
        embedder = TileEmbedder(model, variables, batch_size=config.batch_size)
      embedder.set_variables(variables)
      table = embed_clips(features, silhouette_clips, {'embedding': embedder}, tile_frames=tile_frames,
                          hop_frames=tile_frames)
      labels = np.array([features.label_index(c.label) for c in silhouette_clips])[table['clip_index']]
      metrics['silhouette'] = probes.silhouette(table['embedding'], labels, seed=config.seed)
    return metrics

  def schedule_length(done: int, rate: float) -> int:
    """Steps the learning-rate schedule spans: the run's length, or, under a time budget, the steps it will reach."""
    if not budget_s or not rate:
      return num_steps
    return int(min(num_steps, done + rate * max(budget_s - spent_s, 0.0)))

  logging.info('Training %s on %d clips (%d held out) of %s: %d steps (%d per epoch)%s, global batch %d on %d '
               'device(s) with %s.', config.model.name, len(train_clips), len(held_out_clips), features.root,
               num_steps, steps_per_epoch, f' or {config.train_minutes:g} min' if budget_s else '',
               config.batch_size, devices, config.parallel)
  # A streamed window changes every phase_steps steps: no compiled call spans two.
  boundaries = [config.log_every, eval_every, config.checkpoint_every, getattr(loader, 'phase_steps', 0)]
  plan = _Lookahead(_dispatches(start_step, num_steps, steps_per_call, boundaries), ahead=2)
  last_metrics, files_written = {}, False
  # Signs that training stopped learning, warned of once.
  previous_log, peak_grad_norm, stall, stall_warned = None, 0.0, None, False
  run_start, window_start, window_steps, paused_s = time.time(), time.time(), 0, 0.0
  # Under a budget the schedule's length is re-estimated at every log line; a resumed run starts from the one its
  # checkpoint was saved with.
  total_steps = int(saved_schedule) if saved_schedule is not None else schedule_length(start_step, 0.0)
  try:
    for index, ((step, n), upcoming) in enumerate(plan):
      if loader is not None:
        data = loader.get(step, n, ahead=upcoming)
      lrs = np.zeros(steps_per_call, np.float32)
      lrs[:n] = step_lib.learning_rate_at(config.optimizer, np.arange(step, step + n), total_steps)
      lrs, count = parallel.put_replicated(lrs), placed_count(n)
      with jax.transfer_guard('disallow'):  # Nothing crosses from the host but what was placed above.
        device_state, acc = loop(device_state, acc, data, lrs, rng, count)
      done = step + n
      window_steps += n
      if not precompiled and index == 0:
        jax.block_until_ready(acc)
        run_start = window_start = time.time()
      elapsed_s = spent_s + time.time() - run_start
      out_of_time = bool(budget_s) and _agreed(elapsed_s >= budget_s)
      last = done == num_steps or out_of_time
      is_log, is_eval = done % config.log_every == 0 or last, done % eval_every == 0 or last
      is_checkpoint = done % config.checkpoint_every == 0 or last
      if not (is_log or is_eval or is_checkpoint):
        continue
      values = parallel.get_metrics(acc)  # Waits for the call: every boundary checks that its steps were finite.
      if values['first_bad_step'] >= 0:
        bad = values['first_bad_step'] + 1
        writer.write(bad, {'loss': values['bad_loss'], 'grad_norm': values['bad_grad_norm']}, prefix='train/')
        raise TrainingError(_non_finite_message(values, bad, checkpointer.latest_step()))
      if not files_written and is_chief:
        _check_fingerprint(workdir, model_info)  # Again: another run may have started here meanwhile.
        with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
          f.write(config.to_json_best_effort(indent=1))
        checkpoint_lib.write_model_info(workdir, model_info)
      files_written = True
      if is_log:
        window_s = time.time() - window_start - paused_s
        rate = window_steps / window_s if window_s > 0 else 0.0
        total_steps = schedule_length(done, (done - start_step) / max(elapsed_s - spent_s, 1e-9))
        last_metrics = {k: v / max(values['count'], 1) for k, v in values['sums'].items()}
        lr = float(step_lib.learning_rate_at(config.optimizer, done - 1, total_steps))
        last_metrics |= {'learning_rate': lr, 'steps_per_s': rate, 'train_seconds': elapsed_s,
                         'schedule_steps': total_steps}
        if store == 'stream':  # This process's reads so far (each process reads its own share).
          last_metrics['read_gb'] = loader.reader.bytes_read / 2**30
        writer.write(done, last_metrics, prefix='train/')
        peak_grad_norm = max(peak_grad_norm, last_metrics['grad_norm'])
        stall = stall or _stall_reason(last_metrics, previous_log, peak_grad_norm)
        previous_log = last_metrics
        if is_chief:
          eta = (num_steps - done) / rate if rate > 0 else float('nan')
          if budget_s:
            eta = min(eta, max(budget_s - elapsed_s, 0.0))
          logging.info('step %d/%d  loss %.4f  active %.2f  %.2f steps/s  ETA %.0f s', done, num_steps,
                       last_metrics['loss'], last_metrics.get('active_fraction', float('nan')), rate, eta)
        acc = parallel.put_replicated(zero_metrics)
        window_start, window_steps, paused_s = time.time(), 0, 0.0
      pause = time.time()
      if is_eval:
        eval_metrics = evaluate(device_state)
        writer.write(done, eval_metrics, prefix='eval/')
        stall = stall or _stall_reason(eval_metrics, held_out=True)
      if stall and not stall_warned:
        # Warned, not stopped: the signs are rules of thumb, and stopping a run they misjudge would lose more than
        # finishing one that has collapsed.
        stall_warned = True
        writer.write(done, {'collapsed': 1.0}, prefix='train/')
        if is_chief:
          logging.warning('Step %d: %s. The usual cause is a learning rate too high (config.optimizer.learning_rate='
                          '%g): its first updates leave the ReLUs dead. Lower it or set '
                          'config.optimizer.grad_clip_norm, and train again in a new --workdir.', done, stall,
                          config.optimizer.learning_rate)
      if is_checkpoint:
        clock_s = spent_s + time.time() - run_start
        writer.write(done, {'train_seconds': clock_s}, prefix='train/')
        checkpointer.save(done, parallel.get_state(device_state), force=True,
                          progress={'train_seconds': clock_s, 'schedule_steps': int(total_steps)})
      paused_s += time.time() - pause
      if out_of_time:
        logging.info('Stopped at step %d: the time budget of %g min is spent.', done, config.train_minutes)
        break
  finally:
    if loader is not None:
      loader.close()
    checkpointer.close()
    writer.close()
  return last_metrics


def _non_finite_message(values: dict, step: int, last_saved: int | None) -> str:
  """The stop message of a non-finite step, naming the newest checkpoint actually saved intact."""
  loss, grad_norm = values['bad_loss'], values['bad_grad_norm']
  if math.isfinite(loss) and math.isfinite(grad_norm):
    what = (f'The update of step {step} made the train state non-finite (its loss {loss:.4g} and gradient norm '
            f'{grad_norm:.4g} were finite)')
  else:
    what = f'Non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}'
  if last_saved is None:
    kept = 'no checkpoint was saved before it, so the same command starts afresh'
  else:
    kept = f'the last intact checkpoint (step {last_saved}) is kept, and the same command resumes from it'
  return (f'{what}; it was not saved: {kept}. Lower config.optimizer.learning_rate or set '
          'config.optimizer.grad_clip_norm, then run dem-jax train again.')


def _stall_reason(metrics: dict, previous: dict | None = None, peak_grad_norm: float = 0.0, *,
                  held_out: bool = False) -> str | None:
  """Why a log line's (or an evaluation's) metrics say training stopped learning, else None: every tile mapped to
  one point (distances to the neighbour and distant tiles ~0 against the embedding's norm), or, at two log lines in
  a row, a gradient norm ~0 (a millionth of the largest this run logged, or 0) while the loss is not 0 (a model
  that satisfies every margin has a zero loss and gradient)."""
  if 'd_pos' in metrics and 'd_neg' in metrics:
    scale = max(metrics.get('embedding_norm', 1.0), 1e-3) ** 2
    if max(metrics['d_pos'], metrics['d_neg']) <= 1e-6 * scale:
      where = 'held-out' if held_out else 'training'
      return (f'the embedding has collapsed: every {where} tile maps to the same point (its distances to the '
              'neighbour and distant tiles are ~0)')
  if previous is not None and all('grad_norm' in m and m['grad_norm'] <= 1e-6 * peak_grad_norm and m['loss'] > 0
                                  for m in (metrics, previous)):
    return (f'the updates have stopped: the gradient norm was ~0 ({metrics["grad_norm"]:.3g}) at two log lines in a '
            f'row while the loss was {metrics["loss"]:.4g}')
  return None


def _hparams(config) -> dict:
  """The settings worth comparing runs by, for TensorBoard's hparams view (MetricWriter flattens them)."""
  keep = ('seed', 'batch_size', 'num_steps', 'train_minutes', 'parallel', 'model', 'loss', 'optimizer', 'data')
  return {k: v for k, v in config.to_dict().items() if k in keep}


def _agreed(flag: bool) -> bool:
  """Process 0's value of `flag` on every process (a stop decision must be the same everywhere)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))
