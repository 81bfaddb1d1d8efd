r"""Triplet training of the embedding: `train_and_evaluate(config, workdir)` and its command line.

    ./launch.sh train --config=configs/dcase.py --workdir=/scratch/dcase_run \
        --config.features_dir=/data/features/dcase_dev [--config.parallel=jit] [--distributed]

The run resumes from the latest checkpoint in the workdir by itself, and sees the same batches and dropout masks
as an uninterrupted run (both are functions of the seed and the step).
"""

from __future__ import annotations

import logging
import math
import os
import time

import jax
import numpy as np

from dem_jax import checkpoint as checkpoint_lib
from dem_jax import cpu_ops
from dem_jax import log_util
from dem_jax import losses
from dem_jax import models
from dem_jax import probes
from dem_jax import train_step as step_lib
from dem_jax.embed import embed_clips, TileEmbedder
from dem_jax.features import FeaturesError, open_features
from dem_jax.input_pipeline import TripletLoader
from dem_jax.metric_writer import MetricWriter
from dem_jax.sampler import TripletSampler


class TrainingError(RuntimeError):
  """Training cannot go on; the message names the cause and the fix."""


def _select(features, config):
  """(train clips, held-out clips) for the configured fold or split."""
  fold = config.data.fold or None
  if features.folds() and fold is not None and fold not in features.folds():
    raise TrainingError(f'config.data.fold={fold}, but {features.root} has folds {features.folds()}; pick one of '
                        'them, or 0 to train on all.')
  train = features.select(features.train_splits(fold))
  held_out = []
  if features.folds():
    if fold is not None:
      held_out = features.select(features.test_splits(fold))
  else:
    test = [s for s in features.test_splits() if s not in features.train_splits()]
    held_out = features.select(test)
  return train, held_out


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains for config.num_steps (or num_epochs) steps; returns the last step's metrics."""
  workdir = os.path.abspath(workdir)
  is_chief = jax.process_index() == 0
  if not config.features_dir:
    raise TrainingError('config.features_dir is empty: point it at a preprocessing output with '
                        '--config.features_dir=DIR (see ./launch.sh preprocess).')
  try:
    features = open_features(config.features_dir)
  except FeaturesError as e:
    raise TrainingError(str(e)) from None
  if not features.clips:
    raise TrainingError(f'{config.features_dir} holds no clips.')

  devices = jax.device_count()
  if config.batch_size % devices:
    raise TrainingError(f'config.batch_size={config.batch_size} does not divide across {devices} devices; use a '
                        f'multiple of {devices} (e.g. --config.batch_size={devices * max(1, config.batch_size // devices)}).')

  tile_frames = features.frontend.frames_for_seconds(config.data.tile_seconds)
  neighbour_frames = int(round(config.data.neighbour_seconds * features.frame_rate))
  train_clips, held_out_clips = _select(features, config)
  if not train_clips:
    raise TrainingError(f'No training clips in {config.features_dir} for config.data.fold={config.data.fold}.')
  sampler = TripletSampler(train_clips, tile_frames=tile_frames, neighbour_frames=neighbour_frames,
                           cross_clip_neighbours=config.data.cross_clip_neighbours,
                           distant_other_group=config.data.distant_other_group, seed=config.seed)
  if sampler.skipped:
    logging.warning('%d training clips are shorter than a tile (%d frames) and are not used, e.g. %s',
                    len(sampler.skipped), tile_frames, sampler.skipped[:3])
  eval_sampler = None
  if held_out_clips:
    try:
      eval_sampler = TripletSampler(held_out_clips, tile_frames=tile_frames, neighbour_frames=neighbour_frames,
                                    cross_clip_neighbours=config.data.cross_clip_neighbours,
                                    distant_other_group=config.data.distant_other_group, seed=config.seed + 1)
    except ValueError as e:
      logging.warning('No held-out triplet loss: %s', e)

  steps_per_epoch = sampler.steps_per_epoch(config.batch_size)
  num_steps = config.num_steps or config.num_epochs * steps_per_epoch
  eval_every = config.eval_every or steps_per_epoch

  band_mean, band_std = features.norm_stats(features.train_splits(config.data.fold or None))
  band_std = np.maximum(band_std, 1e-3)  # A band that never changes (e.g. above a low-pass) must not divide by 0.
  parallel = step_lib.DataParallel(config.parallel)
  model = models.create_model(config.model, band_mean=band_mean, band_std=band_std, axis_name=parallel.axis_name)
  optimizer = step_lib.make_optimizer(config.optimizer)
  loss_fn = losses.get_loss_fn(config.loss.name, margin=config.loss.margin, l2=config.loss.l2)
  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  state = step_lib.create_train_state(init_rng, model, optimizer, (tile_frames, features.n_mels))

  os.makedirs(workdir, exist_ok=True)
  checkpointer = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.keep_checkpoints,
                                             save_every=config.checkpoint_every)
  start_step = checkpointer.latest_step() or 0
  if start_step:
    state = checkpointer.restore(state, start_step)
    logging.info('Resumed from the checkpoint of step %d in %s.', start_step, checkpointer.directory)
  writer = MetricWriter(workdir, enabled=is_chief)
  writer.truncate_after(start_step)
  if is_chief:
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=1))
    checkpoint_lib.write_model_info(workdir, {
        'model': config.model.to_dict(), 'band_mean': band_mean.tolist(), 'band_std': band_std.tolist(),
        'tile_frames': tile_frames, 'tile_seconds': config.data.tile_seconds, 'frontend': dict(vars(features.frontend)), 'features_dir': features.root,
        'labels': features.labels, 'fold': config.data.fold, 'dataset': features.dataset})

  train_step = parallel.compile_train_step(step_lib.make_train_step(model, optimizer, loss_fn,
                                                                    axis_name=parallel.axis_name))
  eval_step = parallel.compile_eval_step(step_lib.make_eval_step(model, loss_fn, axis_name=parallel.axis_name))
  device_state = parallel.put_state(state)

  loader = TripletLoader(features, sampler, config.batch_size, process_index=jax.process_index(),
                         process_count=jax.process_count(), prefetch=config.data.prefetch,
                         num_threads=config.data.num_threads)
  eval_batches = []
  if eval_sampler is not None:
    with TripletLoader(features, eval_sampler, config.batch_size, process_index=jax.process_index(),
                       process_count=jax.process_count(), prefetch=0) as eval_loader:
      eval_batches = [eval_loader.batch(i) for i in range(config.data.eval_batches)]
  silhouette_clips = [c for c in held_out_clips if c.label and c.num_frames >= tile_frames]
  silhouette_clips = silhouette_clips[:config.data.eval_max_clips]
  embedder = None

  def evaluate(step: int, state_on_device) -> dict:
    metrics = {}
    if eval_batches:
      values = [parallel.get_metrics(eval_step(state_on_device, parallel.put_batch(b))) for b in eval_batches]
      metrics = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
    if len({c.label for c in silhouette_clips}) >= 2 and is_chief:
      nonlocal embedder
      host_state = parallel.get_state(state_on_device)
      variables = {'params': host_state.params, 'batch_stats': host_state.batch_stats}
      if embedder is None:
        embedder = TileEmbedder(model, variables, batch_size=config.batch_size)
      embedder.set_variables(variables)
      table = embed_clips(features, silhouette_clips, {'z': embedder}, tile_frames=tile_frames,
                          hop_frames=tile_frames)
      labels = np.array([features.label_index(c.label) for c in silhouette_clips])[table['clip_index']]
      metrics['silhouette'] = probes.silhouette(table['z'], labels, seed=config.seed)
    return metrics

  logging.info('Training %s on %d clips (%d held out) of %s: %d steps (%d per epoch), global batch %d on %d '
               'device(s) with %s.', config.model.name, len(train_clips), len(held_out_clips), features.root,
               num_steps, steps_per_epoch, config.batch_size, devices, config.parallel)
  last_metrics, pending = {}, None
  t_start, steps_timed = time.time(), 0

  def fetch(pending_step, pending_metrics):
    """Host copy of an earlier step's metrics; stops the run on a non-finite loss."""
    values = parallel.get_metrics(pending_metrics)
    if not math.isfinite(values['loss']):
      writer.write(pending_step, values, prefix='train/')
      raise TrainingError(f'Non-finite loss ({values["loss"]}) at step {pending_step}. The last good checkpoint '
                          f'(step {checkpointer.latest_step()}) is kept; lower config.optimizer.learning_rate or '
                          'enable config.optimizer.grad_clip_norm, then run again.')
    return values

  def log(done: int, values: dict) -> None:
    nonlocal last_metrics
    last_metrics = values
    elapsed = time.time() - t_start
    rate = steps_timed / elapsed if elapsed > 0 else 0.0
    lr = float(step_lib.learning_rate_at(config.optimizer, done - 1))
    writer.write(done, last_metrics | {'learning_rate': lr, 'steps_per_s': rate}, prefix='train/')
    eta = (num_steps - done) / rate if rate > 0 else float('nan')
    if is_chief:
      logging.info('step %d/%d  loss %.4f  active %.2f  %.2f steps/s  ETA %.0f s', done, num_steps,
                   last_metrics['loss'], last_metrics.get('active_fraction', float('nan')), rate, eta)

  try:
    for step in range(start_step, num_steps):
      batch = parallel.put_batch(loader.batch(step))
      device_state, metrics = train_step(device_state, batch, step_rng)
      if pending is not None:
        # The previous step's metrics, read while this step runs: a non-finite loss stops the run at its own step.
        prev_done, prev_metrics = pending
        values = fetch(prev_done, prev_metrics)
        if prev_done % config.log_every == 0:
          log(prev_done, values)
      steps_timed += 1
      done = step + 1
      pending = (done, metrics)
      if done % eval_every == 0 or done == num_steps:
        fetch(done, metrics)
        writer.write(done, evaluate(done, device_state), prefix='eval/')
      if done % config.checkpoint_every == 0 or done == num_steps:
        fetch(done, metrics)  # Never save a state whose step went non-finite.
        checkpointer.save(done, parallel.get_state(device_state), force=True)
    if pending is not None:
      log(pending[0], fetch(*pending))
  finally:
    loader.close()
    checkpointer.close()
    writer.close()
  return last_metrics


def main(argv):
  del argv
  from absl import flags
  FLAGS = flags.FLAGS
  cpu_ops.retain_freed_memory_on_cpu()  # The step frees and re-allocates the same large buffers every time.
  if FLAGS.distributed:
    kwargs = {}
    if FLAGS.coordinator_address:
      kwargs = dict(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                    process_id=FLAGS.process_id)
    jax.distributed.initialize(**kwargs)
  logging.getLogger().setLevel(logging.INFO)
  log_util.quiet_library_logs()
  logging.info('JAX process %d of %d, local devices: %s', jax.process_index(), jax.process_count(),
               jax.local_devices())
  try:
    train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (TrainingError, ValueError) as e:
    raise SystemExit(f'train: {e}') from None


if __name__ == '__main__':
  from absl import app
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'Training config (a Python file with get_config).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and the config go here; a run resumes from it.',
                      required=True)
  flags.DEFINE_bool('distributed', False, 'Multi-host: call jax.distributed.initialize() (cluster env or flags).')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (else from the cluster environment).')
  flags.DEFINE_integer('num_processes', None, 'Processes in all (with --coordinator_address).')
  flags.DEFINE_integer('process_id', None, 'This process (with --coordinator_address).')
  flags.mark_flag_as_required('config')
  app.run(main)
