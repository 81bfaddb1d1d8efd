"""The trainer end to end on the sample data: CLI, resume after a real kill, and its failure messages."""

import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from dem_jax.configs import dcase as dcase_config
from dem_jax import checkpoint as checkpoint_lib
from dem_jax import train as train_lib
from dem_jax.metric_writer import read_metrics
from dem_jax.sampler import SamplerError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny config made tinier still: half-second tiles, small batches, a short evaluation.
TINY = ['--config.data.tile_seconds=0.5', '--config.data.neighbour_seconds=0.5', '--config.batch_size=8',
        '--config.data.eval_batches=1', '--config.data.eval_max_clips=16']


def tiny_config(features_dir, **overrides):
  config = dcase_config.get_config('tiny')
  config.features_dir = features_dir
  config.data.tile_seconds = config.data.neighbour_seconds = 0.5
  config.batch_size = 8
  config.data.eval_batches = 1
  config.data.eval_max_clips = 16
  for key, value in overrides.items():
    target = config
    *path, leaf = key.split('.')
    for p in path:
      target = target[p]
    target[leaf] = value
  return config


def train_cli(workdir, features_dir, *flags, devices=1):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices))
  return [sys.executable, '-m', 'dem_jax', 'train', '--config=configs/dcase.py:tiny', f'--workdir={workdir}',
          f'--config.features_dir={features_dir}', *TINY, *flags], env


def losses_by_step(workdir):
  return {r['step']: r['train/loss'] for r in read_metrics(str(workdir)) if 'train/loss' in r}


def test_two_step_run_through_the_launcher(dcase_features, tmp_path):
  workdir = tmp_path / 'run'
  result = subprocess.run([os.path.join(ROOT, 'launch.sh'), 'train', '--config=configs/dcase.py:tiny',
                           f'--workdir={workdir}', f'--config.features_dir={dcase_features}', *TINY,
                           '--config.num_steps=2', '--config.log_every=1'],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_NUM_CPU_DEVICES='2'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert checkpoint_lib.Checkpointer(str(workdir)).all_steps() == [2]
  records = read_metrics(str(workdir))
  train = [r for r in records if 'train/loss' in r]
  assert [r['step'] for r in train] == [1, 2] and all(np.isfinite(r['train/loss']) for r in train)
  assert {'train/active_fraction', 'train/embedding_norm', 'train/learning_rate', 'train/steps_per_s'} <= set(train[0])
  evals = [r for r in records if 'eval/loss' in r]
  assert evals and evals[-1]['step'] == 2 and -1 <= evals[-1]['eval/silhouette'] <= 1
  saved = json.load(open(workdir / 'config.json'))
  assert saved['features_dir'] == dcase_features and saved['batch_size'] == 8
  info = checkpoint_lib.read_model_info(str(workdir))
  assert info['tile_frames'] == 48 and len(info['band_mean']) == 128
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir / 'tensorboard'))


def test_killed_run_resumes_with_the_uninterrupted_loss_sequence(dcase_features, tmp_path):
  # With augmentation on: its draws follow the step, so a resumed run draws what the uninterrupted one did.
  flags = ['--config.num_steps=40', '--config.checkpoint_every=4', '--config.log_every=1', '--config.eval_every=40',
           '--config.data.augment.freq_shift=4', '--config.data.augment.mixup=0.2']
  reference = tmp_path / 'reference'
  cmd, env = train_cli(reference, dcase_features, *flags)
  subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)

  workdir = tmp_path / 'killed'
  cmd, env = train_cli(workdir, dcase_features, *flags)
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoints = workdir / 'checkpoints'
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if checkpoints.is_dir() and any(d.isdigit() and int(d) >= 8 for d in os.listdir(checkpoints)):
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(losses_by_step(workdir))
  assert killed_at < 40, 'the run must be killed before it finishes'

  subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
  resumed, uninterrupted = losses_by_step(workdir), losses_by_step(reference)
  assert sorted(resumed) == sorted(uninterrupted) == list(range(1, 41))
  np.testing.assert_allclose([resumed[s] for s in range(1, 41)], [uninterrupted[s] for s in range(1, 41)],
                             rtol=1e-6)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(dcase_features, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'nan')
  train_lib.train_and_evaluate(tiny_config(dcase_features, num_steps=2, checkpoint_every=2), workdir)
  real = train_lib.losses.get_loss_fn

  def poisoned(name, **kw):
    loss_fn = real(name, **kw)

    def nan_loss(*args, **kwargs):
      loss, metrics = loss_fn(*args, **kwargs)
      return loss * np.nan, metrics | {'loss': metrics['loss'] * np.nan}
    return nan_loss

  monkeypatch.setattr(train_lib.losses, 'get_loss_fn', poisoned)
  with pytest.raises(train_lib.TrainingError, match=r'step 3\b.*step 2'):
    train_lib.train_and_evaluate(tiny_config(dcase_features, num_steps=6, checkpoint_every=2), workdir)
  assert checkpoint_lib.Checkpointer(workdir).all_steps() == [2]


def test_a_non_finite_update_is_never_saved_and_a_nan_learning_rate_is_refused(dcase_features, tmp_path,
                                                                             monkeypatch):
  # The run that was lost: a workdir keeping one checkpoint, resumed with learning_rate=nan. Refused at the start.
  workdir = tmp_path / 'w'
  settings = dict(checkpoint_every=2, keep_checkpoints=1, log_every=2,
                  **{'data.eval_batches': 0, 'data.eval_max_clips': 0})  # No evaluation: not what this is about.
  train_lib.train_and_evaluate(tiny_config(dcase_features, num_steps=2, **settings), str(workdir))
  log = (workdir / 'metrics.jsonl').read_bytes()
  with pytest.raises(train_lib.TrainingError, match=r'^config.optimizer.learning_rate=nan must be a finite number > 0'):
    train_lib.train_and_evaluate(tiny_config(dcase_features, num_steps=6, **settings,
                                             **{'optimizer.learning_rate': float('nan')}), str(workdir))
  assert (workdir / 'metrics.jsonl').read_bytes() == log
  # A rate that turns NaN from the third step on (as a schedule gone wrong would): step 3's loss and gradient are
  # finite, the state its update makes is not. The step's own check stops the run before step 4's checkpoint.
  real = train_lib.step_lib.learning_rate_at
  monkeypatch.setattr(train_lib.step_lib, 'learning_rate_at', lambda optimizer, step, total_steps=None: np.where(
      np.asarray(step) >= 2, np.float32(np.nan), real(optimizer, step, total_steps)))
  with pytest.raises(train_lib.TrainingError, match=r'^The update of step 3 made the train state non-finite .*'
                                                    r'the last intact checkpoint \(step 2\) is kept'):
    train_lib.train_and_evaluate(tiny_config(dcase_features, num_steps=6, **settings), str(workdir))
  checkpoints = checkpoint_lib.Checkpointer(str(workdir), read_only=True)
  assert checkpoints.all_steps() == [2] and checkpoints.latest_step() == 2  # keep_checkpoints=1 pruned nothing.
  assert int(checkpoints.restore_raw()['step']) == 2


def test_a_second_trainer_on_a_workdir_is_refused_naming_the_first(dcase_features, tmp_path):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  (workdir / 'metrics.jsonl').write_text('{"step": 1, "train/loss": 0.5}\n')
  with open(workdir / train_lib.LOCK_NAME, 'w', encoding='utf-8') as held:  # The first trainer's lock.
    fcntl.flock(held, fcntl.LOCK_EX)
    held.write('host trainer-7, pid 4242\n')
    held.flush()
    with pytest.raises(train_lib.TrainingError, match=r'is in use by another dem-jax train \(host trainer-7, pid '
                                                      r'4242\)\. Wait for it to end .*another --workdir\.$'):
      train_lib.train_and_evaluate(tiny_config(dcase_features, num_steps=2), str(workdir))
  assert (workdir / 'metrics.jsonl').read_text() == '{"step": 1, "train/loss": 0.5}\n'
  assert sorted(os.listdir(workdir)) == [train_lib.LOCK_NAME, 'metrics.jsonl']
  # Its holder gone (the kernel drops a flock with its process), the lock file it left is taken over.
  lock = train_lib._lock_workdir(str(workdir))
  assert (workdir / train_lib.LOCK_NAME).read_text() == f'host {socket.gethostname()}, pid {os.getpid()}\n'
  lock.close()


def test_a_collapsed_run_is_flagged_once_in_the_log_and_the_metrics(dcase_features, tiny_workdir, tmp_path, caplog):
  workdir = tmp_path / 'w'
  config = tiny_config(dcase_features, num_steps=4, log_every=1, eval_every=4, checkpoint_every=4,
                       **{'optimizer.learning_rate': 1e6})
  train_lib.train_and_evaluate(config, str(workdir))  # Warned, not stopped: the run ends as usual.
  assert [r['step'] for r in read_metrics(str(workdir)) if 'train/collapsed' in r] == [3]
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  warned = [m for m in warned if 'learning rate too high' in m]
  assert len(warned) == 1 and warned[0].startswith('Step 3: the updates have stopped'), warned
  assert '(config.optimizer.learning_rate=1e+06)' in warned[0]
  assert checkpoint_lib.Checkpointer(str(workdir), read_only=True).latest_step() == 4
  assert not [r for r in read_metrics(tiny_workdir) if 'train/collapsed' in r]  # A healthy run is not flagged.


def test_failures_name_the_setting_and_the_fix(dcase_features, tmp_path):
  workdir = str(tmp_path / 'w')
  with pytest.raises(train_lib.TrainingError, match='features_dir'):
    train_lib.train_and_evaluate(tiny_config(''), workdir)
  with pytest.raises(train_lib.TrainingError, match='preprocess'):
    train_lib.train_and_evaluate(tiny_config(str(tmp_path / 'missing')), workdir)
  with pytest.raises(train_lib.TrainingError, match=r'batch_size=6 .* 4 devices'):
    train_lib.train_and_evaluate(tiny_config(dcase_features, batch_size=6), workdir)
  with pytest.raises(SamplerError, match='tile_seconds'):
    train_lib.train_and_evaluate(tiny_config(dcase_features, **{'data.tile_seconds': 30.0}), workdir)
  with pytest.raises(train_lib.TrainingError, match='fold'):
    train_lib.train_and_evaluate(tiny_config(dcase_features, **{'data.fold': 7}), workdir)


def free_port():
  import socket
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


# pmap here; jit across two processes is trained by tests/test_streaming.py's two-host test (a minute each).
@pytest.mark.parametrize('parallel', ['pmap'])
def test_two_hosts_train_like_one(dcase_features, tmp_path, parallel):
  """Two processes of 2 devices each (jax.distributed on localhost) reproduce one process of 4 devices."""
  flags = ['--config.num_steps=3', '--config.log_every=1', f'--config.parallel={parallel}',
           '--config.data.eval_batches=1', '--config.eval_every=3']
  cmd, env = train_cli(tmp_path / 'one', dcase_features, *flags, devices=4)
  subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
  port = free_port()
  procs = []
  for rank in range(2):
    cmd, env = train_cli(tmp_path / 'two', dcase_features, *flags, '--distributed',
                         f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={rank}',
                         devices=2)
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True))
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  one, two = losses_by_step(tmp_path / 'one'), losses_by_step(tmp_path / 'two')
  assert sorted(one) == sorted(two) == [1, 2, 3]
  np.testing.assert_allclose([two[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)], rtol=2e-4)


def test_device_and_host_stores_train_alike(dcase_features, tmp_path):
  """The store and the steps per compiled call change speed and memory, never the batches: same losses."""
  runs = {}
  for name, store, per_call in [('device', 'device', 3), ('host', 'host', 2)]:
    config = tiny_config(dcase_features, num_steps=6, log_every=1, eval_every=6, checkpoint_every=6,
                         **{'data.store': store, 'steps_per_dispatch': per_call, 'model.dropout_rate': 0.0})
    train_lib.train_and_evaluate(config, str(tmp_path / name))
    runs[name] = losses_by_step(tmp_path / name)
  assert sorted(runs['device']) == list(range(1, 7))
  for name in ('host',):
    np.testing.assert_allclose([runs[name][s] for s in range(1, 7)], [runs['device'][s] for s in range(1, 7)],
                               rtol=1e-5, err_msg=name)


def test_forced_device_store_that_does_not_fit_names_the_sizes(dcase_features, tmp_path):
  config = tiny_config(dcase_features, num_steps=1, **{'data.store': 'device', 'data.device_memory_fraction': 1e-9})
  with pytest.raises(train_lib.input_pipeline.StoreError, match=r"GiB.*store='host'"):
    train_lib.train_and_evaluate(config, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w' / 'model.json')


def test_restart_with_another_model_is_refused_and_changes_nothing(dcase_features, tmp_path):
  workdir = tmp_path / 'w'
  train_lib.train_and_evaluate(tiny_config(dcase_features, num_steps=2, checkpoint_every=2), str(workdir))
  before = {name: (workdir / name).read_bytes() for name in ('config.json', 'model.json', 'metrics.jsonl')}
  with pytest.raises(train_lib.TrainingError, match=r'another model \(model.embedding_dim: 32 in the workdir, 16 now\)'
                                                    r'.*new --workdir'):
    train_lib.train_and_evaluate(tiny_config(dcase_features, num_steps=4, **{'model.embedding_dim': 16}),
                                 str(workdir))
  # Each field that differs, with both values, however long the model's settings are.
  with pytest.raises(train_lib.TrainingError, match=r'\(model.dropout_rate: 0.1 in the workdir, 0.2 now; '
                                                    r'model.width: 0.125 in the workdir, 0.25 now\)'):
    train_lib.train_and_evaluate(tiny_config(dcase_features, num_steps=4, **{'model.width': 0.25,
                                                                             'model.dropout_rate': 0.2}),
                                 str(workdir))
  assert {name: (workdir / name).read_bytes() for name in before} == before
  # Running longer with the same model is a resume, not another run.
  train_lib.train_and_evaluate(tiny_config(dcase_features, num_steps=4, checkpoint_every=2), str(workdir))
  assert checkpoint_lib.Checkpointer(str(workdir)).latest_step() == 4


def test_non_finite_gradient_stops_like_a_non_finite_loss(dcase_features, tmp_path, monkeypatch):
  import jax.numpy as jnp
  real = train_lib.losses.get_loss_fn

  def poisoned(name, **kw):
    loss_fn = real(name, **kw)

    def finite_loss_nan_gradient(za, zn, zd, **kwargs):
      loss, metrics = loss_fn(za, zn, zd, **kwargs)
      return loss + 0.0 * jnp.sqrt(jnp.abs(za - za)).sum(), metrics  # value unchanged, gradient 0 * inf = NaN
    return finite_loss_nan_gradient

  monkeypatch.setattr(train_lib.losses, 'get_loss_fn', poisoned)
  with pytest.raises(train_lib.TrainingError, match=r'gradient norm \(nan\) at step 1\b.*no checkpoint was saved '
                                                    r'before it, so the same command starts afresh'):
    train_lib.train_and_evaluate(tiny_config(dcase_features, num_steps=4, checkpoint_every=2), str(tmp_path / 'g'))
  assert checkpoint_lib.Checkpointer(str(tmp_path / 'g')).all_steps() == []
  assert not os.path.exists(tmp_path / 'g' / 'model.json')


def test_time_budget_stops_with_a_checkpoint_and_counts_across_restarts(dcase_features, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'budget')
  settings = dict(num_steps=100000, log_every=5, checkpoint_every=1000, **{'optimizer.schedule': 'cosine'})
  config = tiny_config(dcase_features, train_minutes=0.05, **settings)
  train_lib.train_and_evaluate(config, workdir)
  (stop,) = checkpoint_lib.Checkpointer(workdir).all_steps()
  assert 0 < stop < 100000
  # The checkpoint holds the clock the log shows at its step, and the schedule's length: what the budget reaches,
  # not the 100000-step cap.
  progress = checkpoint_lib.Checkpointer(workdir).progress(stop)
  records = [r for r in read_metrics(workdir) if 'train/train_seconds' in r]
  assert records[-1]['step'] == stop and progress['train_seconds'] == records[-1]['train/train_seconds']
  assert 3.0 <= progress['train_seconds'] < 60
  logged = [r['train/schedule_steps'] for r in records if 'train/schedule_steps' in r]
  assert logged and progress['schedule_steps'] == logged[-1] < 100000

  # The log is only a log: without it, a restart still knows that the budget is spent.
  os.remove(os.path.join(workdir, 'metrics.jsonl'))
  with pytest.raises(train_lib.TrainingError, match=r'budget.*is spent.*train_minutes'):
    train_lib.train_and_evaluate(config, workdir)

  # A log that says otherwise (no time spent, a 100000-step schedule) is not believed either: given 3 s more, the run
  # goes on from the checkpoint's clock, with the checkpoint's schedule.
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w', encoding='utf-8') as f:
    f.write(json.dumps({'step': stop, 'train/train_seconds': 0.0, 'train/schedule_steps': 100000}) + '\n')
  schedules = []
  real = train_lib.step_lib.learning_rate_at

  def recording(optimizer_config, step, total_steps=None):
    schedules.append((int(np.min(step)), total_steps))
    return real(optimizer_config, step, total_steps)

  monkeypatch.setattr(train_lib.step_lib, 'learning_rate_at', recording)
  more = tiny_config(dcase_features, train_minutes=progress['train_seconds'] / 60 + 0.05, **settings)
  train_lib.train_and_evaluate(more, workdir)
  assert next(total for first, total in schedules if first == stop) == progress['schedule_steps']
  resumed = [r['train/train_seconds'] for r in read_metrics(workdir) if r['step'] > stop and 'train/train_seconds' in r]
  assert resumed and min(resumed) > progress['train_seconds']
  stop_again = checkpoint_lib.Checkpointer(workdir).latest_step()
  assert stop_again > stop
  assert checkpoint_lib.Checkpointer(workdir).progress(stop_again)['train_seconds'] >= 60 * more.train_minutes


def saved_as_before_progress(workdir, step):
  """Rewrites a checkpoint step as dem_jax saved it before the progress item: the state as orbax's unnamed item."""
  state = checkpoint_lib.Checkpointer(str(workdir), read_only=True).restore_raw(step)
  directory = os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR)
  shutil.rmtree(os.path.join(directory, str(step)))
  with ocp.CheckpointManager(directory) as manager:
    manager.save(step, args=ocp.args.StandardSave(state))
  assert checkpoint_lib.Checkpointer(str(workdir), read_only=True).progress(step) is None


def test_a_checkpoint_without_progress_takes_the_clock_from_the_log_only_where_it_reaches_it(dcase_features,
                                                                                            tmp_path):
  workdir = tmp_path / 'w'
  train_lib.train_and_evaluate(tiny_config(dcase_features, num_steps=2, checkpoint_every=2), str(workdir))
  saved_as_before_progress(workdir, 2)
  # The log's last clock record of step 2 (the one written with the checkpoint) says 500 s: a budgeted run goes on
  # from there.
  with open(workdir / 'metrics.jsonl', 'a', encoding='utf-8') as f:
    f.write(json.dumps({'step': 2, 'train/train_seconds': 500.0}) + '\n')
  train_lib.train_and_evaluate(tiny_config(dcase_features, num_steps=4, checkpoint_every=2, train_minutes=10.0),
                               str(workdir))
  assert 500.0 < checkpoint_lib.Checkpointer(str(workdir)).progress(4)['train_seconds'] < 600.0
  # Without the log the time left is unknown: a budgeted run stops and says how to go on; one without a budget goes on.
  saved_as_before_progress(workdir, 4)
  os.remove(workdir / 'metrics.jsonl')
  with pytest.raises(train_lib.TrainingError, match=r'step 4 .*without the time budget.*--config.train_minutes=0'):
    train_lib.train_and_evaluate(tiny_config(dcase_features, num_steps=6, checkpoint_every=2, train_minutes=10.0),
                                 str(workdir))
  train_lib.train_and_evaluate(tiny_config(dcase_features, num_steps=6, checkpoint_every=2), str(workdir))
  assert checkpoint_lib.Checkpointer(str(workdir)).latest_step() == 6


def test_bad_settings_are_refused_before_anything_is_written(dcase_features, tmp_path):
  workdir = tmp_path / 'w'
  for minutes in (float('nan'), float('inf'), -1.0):
    with pytest.raises(train_lib.TrainingError, match=r'^config.train_minutes=(nan|inf|-1.0) must be a finite number '
                                                      r'.*--config.train_minutes=0') as raised:
      train_lib.train_and_evaluate(tiny_config(dcase_features, num_steps=2, train_minutes=minutes), str(workdir))
    assert '\n' not in str(raised.value)
  # The schedule too, which the run first reads at its first step.
  with pytest.raises(train_lib.TrainingError, match=r"config.optimizer.schedule='linear'"):
    train_lib.train_and_evaluate(tiny_config(dcase_features, num_steps=2, **{'optimizer.schedule': 'linear'}),
                                 str(workdir))
  # Numbers out of their range, NaN and inf among them.
  nan, inf = float('nan'), float('inf')
  for key, value in [('optimizer.learning_rate', nan), ('optimizer.learning_rate', inf),
                     ('optimizer.learning_rate', 0.0), ('optimizer.learning_rate', -1e-3),
                     ('optimizer.decay_steps', 0), ('optimizer.grad_clip_norm', nan), ('loss.margin', inf),
                     ('batch_size', 0), ('num_steps', -5), ('checkpoint_every', 0), ('log_every', 0),
                     ('keep_checkpoints', 0), ('data.tile_seconds', 0.0)]:
    with pytest.raises(train_lib.TrainingError, match=rf'^config\.{re.escape(key)}={value} must be .*; set '
                                                      rf'--config\.{re.escape(key)} to such a value') as raised:
      train_lib.train_and_evaluate(tiny_config(dcase_features, **({'num_steps': 2} | {key: value})), str(workdir))
    assert '\n' not in str(raised.value)
  assert not workdir.exists()


def test_run_length_ends_a_budgeted_run_when_it_comes_first(dcase_features, tmp_path):
  # The `:cpu` recipe's shape: num_epochs with a time budget far from spent. The run stops after its passes, with a
  # checkpoint there, and the cosine spans exactly those steps.
  ends = []
  for epochs in (1, 2):
    workdir = str(tmp_path / f'e{epochs}')
    config = tiny_config(dcase_features, num_steps=0, num_epochs=epochs, train_minutes=10.0, batch_size=64,
                         log_every=1, checkpoint_every=1000, **{'optimizer.schedule': 'cosine'})
    train_lib.train_and_evaluate(config, workdir)
    (step,) = checkpoint_lib.Checkpointer(workdir).all_steps()
    records = read_metrics(workdir)
    assert max(r['step'] for r in records) == step
    assert [r['train/schedule_steps'] for r in records if 'train/schedule_steps' in r][-1] == step
    assert [r for r in records if 'train/train_seconds' in r][-1]['train/train_seconds'] < 300
    ends.append(step)
  assert ends[0] > 0 and ends[1] == 2 * ends[0], ends


def test_budget_shorter_than_one_step_fails_before_training(dcase_features, tmp_path):
  # 0.6 ms: no training step fits. The run stops after compiling, names the setting and writes nothing.
  config = tiny_config(dcase_features, num_steps=100, train_minutes=1e-5)
  with pytest.raises(train_lib.TrainingError, match=r'train_minutes=1e-05 .*shorter than one training step.*'
                                                    r'--config.train_minutes=\d+'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'w'))
  assert checkpoint_lib.Checkpointer(str(tmp_path / 'w')).all_steps() == []
  assert not os.path.exists(tmp_path / 'w' / 'model.json')


def test_augmented_training_changes_the_run_and_bad_settings_fail_at_start(dcase_features, tmp_path):
  plain = train_lib.train_and_evaluate(tiny_config(dcase_features, num_steps=3, log_every=3), str(tmp_path / 'p'))
  augmented = train_lib.train_and_evaluate(
      tiny_config(dcase_features, num_steps=3, log_every=3, **{'data.augment.freq_shift': 4,
                                                               'data.augment.mixup': 0.4,
                                                               'data.augment.eq_db': 6.0,
                                                               'data.augment.time_stretch': 0.2,
                                                               'data.augment.freq_mask': 8,
                                                               'data.augment.time_mask': 0.2}),
      str(tmp_path / 'a'))
  assert np.isfinite(augmented['loss']) and augmented['loss'] != plain['loss']
  with pytest.raises(train_lib.TrainingError, match=r'config.data.augment.mixup=1.5'):
    train_lib.train_and_evaluate(tiny_config(dcase_features, num_steps=3, **{'data.augment.mixup': 1.5}),
                                 str(tmp_path / 'b'))
  config = tiny_config(dcase_features, num_steps=3)
  config.data.augment.pitch = 2
  with pytest.raises(train_lib.TrainingError, match=r'unknown setting.*pitch.*freq_shift, mixup, eq_db, '
                                                    r'time_stretch, freq_mask, time_mask, reverb and low_pass'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'c'))


def test_damaged_latest_checkpoint_resumes_from_the_intact_one_before(dcase_features, tmp_path):
  workdir = tmp_path / 'w'
  train_lib.train_and_evaluate(tiny_config(dcase_features, num_steps=4, checkpoint_every=2, log_every=1),
                               str(workdir))
  saved = max((p for p in (workdir / 'checkpoints' / '4').rglob('*') if p.is_file() and p.name != 'digest.json'),
              key=lambda p: p.stat().st_size)
  data = bytearray(saved.read_bytes())
  data[len(data) // 2] ^= 0xFF
  saved.write_bytes(bytes(data))
  train_lib.train_and_evaluate(tiny_config(dcase_features, num_steps=6, checkpoint_every=2, log_every=1),
                               str(workdir))
  # Steps 3 and 4 were trained again from step 2's state: the log holds each step once, ending at 6.
  assert sorted(losses_by_step(workdir)) == list(range(1, 7))
  assert checkpoint_lib.Checkpointer(str(workdir)).latest_step() == 6
  assert os.listdir(workdir / 'checkpoints_set_aside') == ['4']  # Kept, not deleted.


def test_dispatch_plan_never_crosses_a_boundary_and_is_lazy():
  plan = list(train_lib._dispatches(3, 20, 4, [5, 8]))
  assert plan == [(3, 2), (5, 3), (8, 2), (10, 4), (14, 1), (15, 1), (16, 4)]
  # A budget-bound run may be given a cap of 10**9 steps: the plan is drawn as it goes, with its next calls in view.
  it = iter(train_lib._Lookahead(train_lib._dispatches(0, 10**9, 1, [50]), ahead=2))
  assert next(it) == ((0, 1), [(1, 1), (2, 1)]) and next(it) == ((1, 1), [(2, 1), (3, 1)])
