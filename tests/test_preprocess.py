import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile
import zarr

from dem_jax.configs import features as features_config
from dem_jax import audio
from dem_jax import features as features_lib
from dem_jax.frontend import FrontEnd, log_mel
from dem_jax.preprocess import job
from dem_jax.preprocess import sample_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**storage):
  config = features_config.get_config()
  # Small shards so that even a small data set spans many blocks (one 10-s clip per block).
  config.storage.update(dict(chunk_frames=128, shard_frames=1024) | storage)
  return config


def run_job(data_dir, out, dataset='dcase2018_task5', **kw):
  return job.run(kw.pop('config', small_config()), dataset=dataset, data_dir=data_dir, output_dir=str(out), **kw)


def cli(*args, check=True):
  cmd = [sys.executable, '-m', 'dem_jax', 'preprocess', *args]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if check and result.returncode:
    raise AssertionError(f'{cmd} failed ({result.returncode}):\n{result.stderr[-3000:]}')
  return result


def read_all(out):
  return zarr.open_array(os.path.join(out, features_lib.ARRAY_NAME), mode='r')[:]


def assert_same_output(a, b):
  for name in (features_lib.MANIFEST_NAME, features_lib.INFO_NAME):
    assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name
  np.testing.assert_array_equal(read_all(a), read_all(b))


@pytest.fixture(scope='module')
def dcase_out(dcase_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp('out') / 'dcase'
  summary = run_job(dcase_dir, out, num_workers=2)
  assert summary['clips_written'] == 32 and not summary['failures']
  return str(out)


def test_features_equal_the_front_end_on_each_file(dcase_dir, dcase_out):
  feats = features_lib.open_features(dcase_out)
  fe = FrontEnd()
  assert len(feats) == 32 and feats.n_mels == 128
  for clip in feats.clips[::7]:
    direct = log_mel(audio.load_audio(os.path.join(dcase_dir, clip.path), 16000), fe)
    stored = feats.read(clip.clip_id)
    assert stored.shape == direct.shape == (998, 128)
    # float16 storage: relative rounding 2**-11 on values of magnitude <= 14.
    np.testing.assert_allclose(stored, direct, atol=8e-3, rtol=0)
    np.testing.assert_array_equal(feats.read(clip.clip_id, 100, 598), stored[100:598])


def test_store_opens_with_zarr_python(dcase_out):
  feats = features_lib.open_features(dcase_out)
  arr = zarr.open_array(os.path.join(dcase_out, features_lib.ARRAY_NAME), mode='r')
  assert arr.dtype == np.float16 and arr.shape[1] == 128
  clip = feats.clips[5]
  np.testing.assert_array_equal(arr[clip.frame_offset:clip.frame_offset + clip.num_frames].astype(np.float32),
                                feats.read(clip.clip_id))


def test_norm_stats_cover_the_training_part_only(dcase_out):
  feats = features_lib.open_features(dcase_out)
  train = feats.select(feats.train_splits(fold=2))
  assert train and all(c.split != 'fold2' for c in train)
  frames = np.concatenate([feats.read(c.clip_id) for c in train]).astype(np.float64)
  mean, std = feats.norm_stats(feats.train_splits(fold=2))
  np.testing.assert_allclose(mean, frames.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(std, frames.std(0), rtol=1e-4, atol=1e-5)
  # features.json carries the default training part's statistics (all four folds) ready-made.
  info = json.load(open(os.path.join(dcase_out, features_lib.INFO_NAME)))
  np.testing.assert_allclose(info['norm_stats']['mean'], feats.norm_stats()[0], rtol=1e-6)
  assert info['norm_stats']['splits'] == ['fold1', 'fold2', 'fold3', 'fold4']


def test_summary_has_what_scripts_check(dcase_out):
  summary = json.load(open(os.path.join(dcase_out, features_lib.SUMMARY_NAME)))
  assert summary['clips_written'] == 32 and summary['failures'] == []
  assert summary['audio_seconds'] == pytest.approx(320.0)
  assert summary['wall_seconds'] > 0 and summary['settings']['frontend']['n_mels'] == 128


def test_n_tasks_plus_finalize_equal_one_task(dcase_dir, dcase_out, tmp_path):
  out = tmp_path / 'tasks'
  for i in (2, 0, 1):  # Any order.
    assert run_job(dcase_dir, out, task_index=i, num_tasks=3) is None
  with pytest.raises(features_lib.FeaturesError, match='--finalize'):
    features_lib.open_features(str(out))
  run_job(dcase_dir, out, finalize_only=True)
  assert_same_output(dcase_out, str(out))


def test_finalize_before_all_tasks_says_what_is_missing(dcase_dir, tmp_path):
  out = tmp_path / 'partial'
  run_job(dcase_dir, out, task_index=0, num_tasks=2)
  with pytest.raises(job.PreprocessError, match='not done yet'):
    run_job(dcase_dir, out, finalize_only=True)


def test_other_settings_in_the_same_output_dir_are_refused(dcase_dir, dcase_out, tmp_path):
  out = tmp_path / 'copy'
  shutil.copytree(dcase_out, out)
  config = small_config()
  config.frontend.n_mels = 64
  with pytest.raises(job.PreprocessError, match='frontend'):
    run_job(dcase_dir, out, config=config)


def test_killed_job_run_again_gives_the_uninterrupted_output(tmp_path):
  data = tmp_path / 'data'
  sample_data.write_dcase2018_task5(str(data), labels=('absence', 'working', 'cooking', 'eating'),
                                    sessions_per_label=4, clips_per_session=3, nodes=2, seed=5)
  flags = ['--dataset=dcase2018_task5', f'--data_dir={data}', '--config.storage.chunk_frames=128',
           '--config.storage.shard_frames=1024']
  reference = tmp_path / 'reference'
  cli(*flags, f'--output_dir={reference}')

  out = tmp_path / 'killed'
  markers = out / job.WORK_DIR / 'blocks'
  proc = subprocess.Popen([sys.executable, '-m', 'dem_jax', 'preprocess', *flags, f'--output_dir={out}'], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if markers.is_dir() and len([m for m in os.listdir(markers) if m.endswith('.json')]) >= 3:
      break
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = len([m for m in os.listdir(markers) if m.endswith('.json')])
  assert proc.returncode == -signal.SIGKILL and 3 <= done < 96, 'the job must be killed half-way'
  with pytest.raises(features_lib.FeaturesError):
    features_lib.open_features(str(out))  # Nothing half-written reads as complete.
  cli(*flags, f'--output_dir={out}')
  assert_same_output(str(reference), str(out))


def test_workers_share_the_cores_out_as_blas_threads():
  assert job.blas_threads_per_worker(1, cores=8) == 8
  assert job.blas_threads_per_worker(3, cores=8) == 2  # 6 threads in all: never more than the cores
  assert job.blas_threads_per_worker(16, cores=8) == 1
  assert job.usable_cores() == len(os.sched_getaffinity(0))


def test_the_job_process_works_beside_its_workers_from_the_other_end(monkeypatch):
  import concurrent.futures
  import threading
  main = threading.current_thread().name
  done_by = {}
  worker_started = threading.Event()  # the started worker is slow to start: it waits until this is set

  def fake_block(output_dir, plan_path, index):
    name = threading.current_thread().name
    if name != main:
      assert worker_started.wait(60)
    done_by[index] = name
    if sum(n == main for n in done_by.values()) == 3:
      worker_started.set()
    return {'block': index}

  monkeypatch.setattr(job, '_process_block', fake_block)
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='worker') as pool:
    markers = list(job._blocks_with_workers(pool, 1, 'out', 'plan', list(range(8))))
  assert sorted(m['block'] for m in markers) == list(range(8))  # each block once
  mine = sorted(b for b, name in done_by.items() if name == main)
  theirs = sorted(b for b, name in done_by.items() if name != main)
  # While the worker started, this process did the last blocks; the worker did the first; they met in between.
  assert {5, 6, 7} <= set(mine) and 0 in theirs
  assert mine == list(range(8 - len(mine), 8)) and theirs == list(range(len(theirs)))


def test_bad_files_are_reported_and_the_rest_is_written(dcase_dir, tmp_path):
  data = tmp_path / 'data'
  shutil.copytree(dcase_dir, data)
  a = data / 'audio'
  names = sorted(os.listdir(a))
  (a / names[0]).write_text('this is not audio')  # Non-audio file.
  (a / names[1]).write_bytes(b'')  # Empty file.
  header_only = open(a / names[2], 'rb').read()[:44]
  (a / names[2]).write_bytes(header_only)  # Truncated to its header.
  (a / names[3]).unlink()  # Named in meta.txt, missing on disk.
  y, _ = soundfile.read(a / names[4])
  soundfile.write(a / names[4], y[::2], 8000)  # Another sample rate: resampled, kept.
  soundfile.write(a / names[5], np.zeros((160000, 4)), 16000)  # Digital silence: kept, with a warning.
  out = tmp_path / 'out'
  result = cli('--dataset=dcase2018_task5', f'--data_dir={data}', f'--output_dir={out}')
  summary = json.load(open(out / 'summary.json'))
  failed = {os.path.basename(f['path']): f['reason'] for f in summary['failures']}
  assert set(failed) == set(names[:4])
  assert 'not found' in failed[names[3]]
  assert summary['clips_written'] == 28
  assert any('silence' in w['reason'] for w in summary['warnings'])
  feats = features_lib.open_features(str(out))
  resampled = feats.clip(names[4][:-4])
  assert (resampled.num_frames, resampled.duration) == (998, 10.0)  # 10 s at 8 kHz, resampled to 16 kHz.
  assert '"clips_written": 28' in result.stdout
  # By default one worker per usable core (the affinity mask, not the machine's count).
  assert f'{len(os.sched_getaffinity(0))} worker(s)' in result.stderr
  strict = cli('--dataset=dcase2018_task5', f'--data_dir={data}', f'--output_dir={out}', '--strict', check=False)
  assert strict.returncode != 0 and 'strict' in strict.stderr


def test_nothing_writable_exits_non_zero(tmp_path):
  data = tmp_path / 'data'
  (data / 'x').mkdir(parents=True)
  (data / 'x' / 'a.wav').write_text('not audio')
  result = cli('--dataset=folder', f'--data_dir={data}', f'--output_dir={tmp_path / "out"}', check=False)
  assert result.returncode != 0 and 'no clip could be written' in result.stderr


def test_folder_music_is_resampled_trimmed_and_split(music_dir, tmp_path):
  out = tmp_path / 'music'
  summary = run_job(music_dir, out, dataset='folder')
  assert summary['clips_written'] == 12 and not summary['failures']
  feats = features_lib.open_features(str(out))
  assert feats.labels == list(sample_data.GENRES)
  assert {c.split for c in feats.clips} == {'train', 'test'}
  for clip in feats.clips:
    # 1 s of silence each side of 6 s of sound; trimming at 60 dB removes most of it.
    assert 6.0 <= clip.duration < 7.0, clip
    assert clip.num_frames == FrontEnd().num_frames(int(round(clip.duration * 16000)))
  assert feats.train_splits() == ['train'] and feats.test_splits() == ['test']
