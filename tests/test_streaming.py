"""The streamed store: per-process shares, a window that turns over, draws within it, restarts, and its failures."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from dem_jax import checkpoint as checkpoint_lib
from dem_jax import streaming
from dem_jax import train as train_lib
from dem_jax.features import Clip, open_features
from dem_jax.input_pipeline import Share, StoreError
from dem_jax.parallel import DataParallel
from dem_jax.sampler import ROLES, SamplerError, TripletSampler
from test_train import ROOT, free_port, tiny_config

RESIDENT_GB = 0.006  # Slots of about two of the test set's 20-s recordings: many segments per epoch.


@pytest.fixture(scope='module')
def feats(dcase_features):
  return open_features(dcase_features)


@pytest.fixture(scope='module')
def sampler(feats):
  return TripletSampler(feats.clips, tile_frames=48, neighbour_frames=50, seed=3)


def schedule(sampler, process=0, processes=1, seed=0, resident_gb=RESIDENT_GB):
  return streaming.StreamSchedule(sampler, resident_bytes=int(resident_gb * 2**30), n_mels=128, steps_per_epoch=40,
                                  process=process, num_processes=processes, seed=seed)


def store(feats, sampler, place='host', start_step=0, share=None, seed=0, parallel=None):
  return streaming.StreamStore(feats, sampler, parallel or DataParallel('jit'), global_batch=16, steps_per_call=1,
                               steps_per_epoch=40, resident_gb=RESIDENT_GB, device_fraction=0.5,
                               start_step=start_step, seed=seed, place=place, share=share)


def test_each_epoch_splits_the_recordings_between_the_processes(sampler):
  a, b = schedule(sampler, 0, 2), schedule(sampler, 1, 2)
  for epoch in (0, 1, 2):
    shares = [a.share(epoch), b.share(epoch)]
    assert sorted(np.concatenate(shares)) == list(range(len(sampler.timelines)))
    for s, share in zip((a, b), shares):  # The epoch's segments are its share, each timeline once.
      parts = [s.segment(epoch * s.segments_per_epoch + j) for j in range(s.segments_per_epoch)]
      np.testing.assert_array_equal(np.concatenate(parts), share)
  assert not np.array_equal(a.share(0), a.share(1))


def test_segments_fit_their_slots_and_every_recording_enters_the_window_each_epoch(sampler):
  s = schedule(sampler)
  assert s.segments_per_epoch > s.window_segments > 1
  for epoch in range(3):
    seen = set()
    for phase in range(epoch * s.segments_per_epoch, (epoch + 1) * s.segments_per_epoch):
      for index in s.window(phase):
        segment = s.segment(index)
        assert sampler.lengths[segment].sum() <= s.slot_frames
        seen.update(segment.tolist())
    assert seen >= set(s.share(epoch).tolist())


def resident_timeline(s, reader_slots, phase, row):
  """(timeline, position) of the window row `row` in `phase`, from the schedule alone."""
  for index in s.window(phase):
    base = (index % reader_slots) * s.slot_frames
    for t in s.segment(index):
      length = int(s.sampler.lengths[t])
      if base <= row < base + length:
        return int(t), row - base
      base += length
  raise AssertionError(f'row {row} is not resident in phase {phase}')


def test_tiles_are_stored_frames_of_resident_recordings_with_a_distant_group(feats, sampler):
  with store(feats, sampler) as streamed:
    s, loader = streamed.schedule, streamed._loader
    for step in (0, 9, 23):
      rows, tiles = loader.rows_at(step), loader.cut(step, 1)
      phase = s.phase(step)
      located = {role: [resident_timeline(s, loader.reader.slots, phase, int(r)) for r in rows[role]]
                 for role in ROLES}
      for (a_tl, _), (n_tl, _), (d_tl, _) in zip(*(located[role] for role in ROLES)):
        assert a_tl == n_tl and sampler.timelines[a_tl].group != sampler.timelines[d_tl].group
      for role in ROLES:
        for i in (0, 7):
          t, pos = located[role][i]
          expected = np.concatenate([feats.read(c, a, b) for c, a, b in sampler.pieces(t, pos)])
          np.testing.assert_array_equal(tiles[role][0, i].astype(np.float32), expected)


def test_a_resumed_store_reads_only_its_window_and_draws_what_the_uninterrupted_one_drew(feats, sampler):
  with store(feats, sampler) as whole:
    for step in range(0, 14):
      uninterrupted = whole._loader.cut(step, 1)
  with store(feats, sampler, start_step=13) as resumed:
    s = resumed.schedule
    window = list(s.window(s.phase(13)))
    # The window and the one segment read ahead of it, nothing before.
    read_at_most = sum(sampler.lengths[s.segment(i)].sum() for i in window + [window[-1] + 1]) * 128 * 2
    assert s.phase(13) > 0 and resumed.reader.bytes_read <= read_at_most
    again = resumed._loader.cut(13, 1)
  for role in ROLES:
    np.testing.assert_array_equal(again[role], uninterrupted[role])
  with store(feats, sampler, start_step=13, share=Share(1, 2)) as other_process:
    assert not np.array_equal(other_process._loader.cut(13, 1)['anchor'], uninterrupted['anchor'])
  with store(feats, sampler, start_step=13, seed=1) as other_seed:
    assert not np.array_equal(other_seed._loader.cut(13, 1)['anchor'], uninterrupted['anchor'])


@pytest.mark.parametrize('mode', ['jit', 'pmap'])
def test_window_on_the_devices_cuts_the_tiles_the_host_window_cuts(feats, sampler, mode):
  parallel = DataParallel(mode, devices=jax.devices()[:4])
  on_devices, in_host = store(feats, sampler, 'device', parallel=parallel), store(feats, sampler, 'host')
  if mode == 'pmap':
    cut = jax.pmap(lambda d, step: on_devices.batch_fn(d, step, 0), axis_name='batch', in_axes=(0, None),
                   devices=jax.devices()[:4])
  else:
    cut = jax.jit(lambda d, step: on_devices.batch_fn(d, step, 0))
  for step in range(0, 3 * on_devices.phase_steps + 1):  # Across three slot overwrites.
    got = jax.device_get(cut(on_devices.get(step, 1), np.int32(step)))
    expected = in_host._loader.cut(step, 1)
    for role in ROLES:
      np.testing.assert_array_equal(np.asarray(got[role]).reshape(expected[role].shape[1:]), expected[role][0])
  on_devices.close()
  in_host.close()


def test_resident_sizes_out_of_range_name_the_setting_and_the_fix(feats, sampler):
  with pytest.raises(StoreError, match=r'resident_gb=0.001 is too small.*at least 0.00'):
    schedule(sampler, resident_gb=0.001)
  with pytest.raises(StoreError, match=r"resident_gb=1e\+06 must be .* below this host's memory"):
    streaming.StreamStore(feats, sampler, DataParallel('jit'), global_batch=16, steps_per_call=1, steps_per_epoch=40,
                          resident_gb=1e6, device_fraction=0.5)


def test_window_without_a_second_group_is_refused_with_the_fix(feats):
  # One session owns all recordings but one: a window of a few recordings soon holds that session alone.
  clips = [dataclasses.replace(c, group='one') if c.group != 'absence_0' else c for c in feats.clips]
  s = schedule(TripletSampler(clips, tile_frames=48, neighbour_frames=50))
  with pytest.raises(StoreError, match=r'single group \(session\).*resident_gb.*distant_other_group=False'):
    for phase in range(s.segments_per_epoch):
      s.tables(phase, slot_of=lambda index: index % s.window_segments)
  few = [c for c in feats.clips if c.group in ('absence_0', 'absence_1')]
  with pytest.raises(StoreError, match='fewer than two for each of 2 processes'):
    schedule(TripletSampler(few, tile_frames=48, neighbour_frames=50), 0, 2)


def test_a_shard_lost_mid_run_is_an_error_naming_the_store_and_the_fix(feats, sampler, tmp_path):
  root = str(tmp_path / 'store')
  shutil.copytree(feats.root, root)
  copy = open_features(root)
  with store(copy, sampler) as streamed:
    first = streamed._loader.cut(0, 1)  # The first window is in.
    shutil.rmtree(os.path.join(root, 'features.zarr', 'c'))
    with pytest.raises(StoreError, match=rf'{re.escape(root)} failed .*Restore it.*resumes from the last checkpoint'):
      for step in range(40):
        streamed._loader.cut(step, 1)
  assert first['anchor'].any()


@pytest.mark.parametrize('place', ['device', 'host'])
def test_non_finite_frames_are_refused_naming_their_clip(feats, sampler, store_with_value, place):
  victim = sampler.timelines[5].clips[1]
  root = store_with_value(feats.root, victim.frame_offset + 7, 3, -np.inf if place == 'host' else np.inf)
  with pytest.raises(StoreError, match=f'clip {victim.clip_id} .*non-finite'):
    with store(open_features(root), sampler, place, parallel=DataParallel('jit', devices=jax.devices()[:1])) as s:
      for step in range(2 * s.schedule.segments_per_epoch * s.phase_steps):
        s.get(step, 1)


def stream_config(features_dir, **overrides):
  """The tiny config, streamed; no held-out monitoring (nothing of the stream's, and it compiles two programs)."""
  return tiny_config(features_dir, **{'data.store': 'stream', 'data.resident_gb': RESIDENT_GB, 'batch_size': 16,
                                      'model.dropout_rate': 0.0, 'log_every': 1, 'data.eval_batches': 0,
                                      'data.eval_max_clips': 0} | overrides)


@pytest.mark.parametrize('setting, value', [('data.resident_gb', float('nan')), ('data.resident_gb', -1.0),
                                            ('data.host_memory_fraction', 0.0)])
def test_stream_settings_out_of_range_are_refused_before_anything_is_written(dcase_features, tmp_path, setting,
                                                                            value):
  with pytest.raises(train_lib.TrainingError, match=rf'config\.{re.escape(setting)}=\S+ must be'):
    train_lib.train_and_evaluate(stream_config(dcase_features, **{setting: value}), str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w' / 'model.json')


def test_a_shard_lost_mid_run_stops_training_and_keeps_the_last_checkpoint(dcase_features, tmp_path, monkeypatch):
  root = str(tmp_path / 'store')
  shutil.copytree(dcase_features, root)
  read = streaming.WindowReader._read

  def losing_the_store(reader, index):
    if index == 6:  # Needed from step 6 on (two steps per segment, four segments resident).
      shutil.rmtree(os.path.join(root, 'features.zarr', 'c'), ignore_errors=True)
    return read(reader, index)

  monkeypatch.setattr(streaming.WindowReader, '_read', losing_the_store)
  workdir = str(tmp_path / 'w')
  # The window in host memory here (the two-host test trains with it on the devices).
  config = stream_config(root, num_steps=12, eval_every=12, checkpoint_every=2,
                         **{'data.device_memory_fraction': 1e-9})
  with pytest.raises(StoreError, match=f'{re.escape(root)} failed'):
    train_lib.train_and_evaluate(config, workdir)
  steps = checkpoint_lib.Checkpointer(workdir).all_steps()
  assert steps and max(steps) <= 6


HOST = r'''
import json, os, shutil, sys
import jax
rank, port, workdir, features_dir = sys.argv[1:]
jax.distributed.initialize(f'localhost:{{port}}', num_processes=2, process_id=int(rank))
from jax.experimental import multihost_utils
sys.path.insert(0, {tests!r})
from test_streaming import stream_config
from dem_jax import train
steps = {{}}

class Recording(train.MetricWriter):  # Every process's view of every step (only process 0 writes files).
  def write(self, step, metrics, *, prefix=''):
    if prefix == 'train/' and 'loss' in metrics:
      steps.setdefault(workdir, {{}})[step] = [metrics['loss'], metrics['read_gb']]
    super().write(step, metrics, prefix=prefix)

train.MetricWriter = Recording
config = stream_config(features_dir, num_steps=24, batch_size=32, checkpoint_every=12)
train.train_and_evaluate(config, workdir)
# Resumed from the checkpoint of step 12, in a copy of the run.
if rank == '0':
  shutil.copytree(workdir, workdir + '_resumed')
  shutil.rmtree(os.path.join(workdir + '_resumed', 'checkpoints', '24'))
multihost_utils.sync_global_devices('copied')
workdir += '_resumed'
train.train_and_evaluate(config, workdir)
print(json.dumps(steps))
'''


def two_hosts(workdir, features_dir):
  """Per process: {workdir: {step: [loss, GiB read by the process]}} of a run of 2 processes of 2 CPU devices
  (jax.distributed) and of its copy resumed from step 12."""
  script = HOST.format(tests=os.path.dirname(os.path.abspath(__file__)))
  port = free_port()
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='2')
  procs = [subprocess.Popen([sys.executable, '-c', script, str(rank), str(port), str(workdir), features_dir],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for rank in range(2)]
  out = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    runs = json.loads(stdout.strip().splitlines()[-1])
    out.append({name: {int(k): v for k, v in steps.items()} for name, steps in runs.items()})
  return out


def test_two_hosts_read_their_own_halves_agree_on_every_step_and_resume_alike(dcase_features, tmp_path):
  features = open_features(dcase_features)
  split = TripletSampler(features.select(features.train_splits(1)), tile_frames=48, neighbour_frames=50)
  split_gb = split.total_frames * features.n_mels * 2 / 2**30
  run, resumed = str(tmp_path / 'run'), str(tmp_path / 'run_resumed')
  first, second = two_hosts(run, dcase_features)
  assert sorted(first[run]) == sorted(second[run]) == list(range(1, 25))
  assert first[run] and [first[run][s][0] for s in first[run]] == [second[run][s][0] for s in first[run]]
  epoch = streaming.StreamSchedule(split, resident_bytes=int(RESIDENT_GB * 2**30), n_mels=128, num_processes=2,
                                   steps_per_epoch=split.steps_per_epoch(32))
  steps_per_epoch = epoch.segments_per_epoch * epoch.phase_steps
  assert 2 * steps_per_epoch <= 24
  for host in (first[run], second[run]):  # Over an epoch a process reads its share: about half the split.
    per_epoch = host[2 * steps_per_epoch][1] - host[steps_per_epoch][1]
    assert 0.3 * split_gb < per_epoch < 0.7 * split_gb, (per_epoch, split_gb)
  assert sorted(first[resumed]) == list(range(13, 25))
  np.testing.assert_allclose([first[resumed][s][0] for s in first[resumed]],
                             [first[run][s][0] for s in first[resumed]], rtol=1e-6)
  # The resumed processes read the window of step 12 and what followed, not the epoch before it.
  assert second[resumed][24][1] < second[run][24][1] - 0.3 * split_gb


def test_a_split_beyond_int32_frames_streams_where_packing_refuses():
  clips = [Clip(clip_id=f'c{i}', path='', label='', group=f'g{i // 2}', recording=f'r{i}', position=0, split='train',
                frame_offset=i * 1_000_000, num_frames=1_000_000, duration=1e4) for i in range(2200)]
  sampler = TripletSampler(clips, tile_frames=498, neighbour_frames=500)
  assert sampler.total_frames > 2**31
  with pytest.raises(SamplerError, match="store='stream'"):
    sampler.tables  # noqa: B018 (the packed stores' tables index the whole split)
  s = streaming.StreamSchedule(sampler, resident_bytes=4 << 30, n_mels=128,
                               steps_per_epoch=sampler.steps_per_epoch(64))
  tables = s.tables(s.segments_per_epoch + 3, slot_of=lambda index: index % s.window_segments)
  assert tables.row_offset.dtype == np.int32 and 0 < int(tables.cumulative[-1]) < s.window_frames


def test_the_benchmarks_synthetic_store_opens_as_a_preprocessed_one(tmp_path):
  from dem_jax.benchmarks.synthetic_store import write_synthetic_store
  features = open_features(write_synthetic_store(str(tmp_path / 'store'), 0.1, recording_minutes=1))
  assert len(features.clips) == 36 and sum(c.duration for c in features.clips) == pytest.approx(360)
  frames = features.read(features.clips[7].clip_id)
  assert frames.shape == (1000, 128) and np.isfinite(frames).all() and frames.std() > 0.5
  # Each recording's consecutive clips form one timeline, two recordings per session.
  sampler = TripletSampler(features.clips, tile_frames=498, neighbour_frames=500)
  assert [t.length for t in sampler.timelines] == [6000] * 6
  assert len({t.group for t in sampler.timelines}) == 3
