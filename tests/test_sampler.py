import collections
import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest
import tensorstore as ts

from conftest import record_store_files
from dem_jax import features as features_lib
from dem_jax import input_pipeline
from dem_jax.features import open_features
from dem_jax.parallel import DataParallel
from dem_jax.sampler import ROLES, SamplerError, TripletSampler


@pytest.fixture(scope='module')
def feats(dcase_features):
  return open_features(dcase_features)


@pytest.fixture(scope='module')
def packed(feats):
  s = make(feats)
  return s, input_pipeline.pack_timelines(feats, s)


def make(feats, **kw):
  args = dict(tile_frames=300, neighbour_frames=500, cross_clip_neighbours=True, distant_other_group=True, seed=3)
  return TripletSampler(feats.clips, **(args | kw))


def test_neighbour_lies_within_the_window_of_the_same_recording(feats):
  s = make(feats)
  t = s.sample(0, 512)
  (a_tl, a_pos), (n_tl, n_pos) = t['anchor'], t['neighbour']
  assert np.array_equal(a_tl, n_tl)
  assert np.all(np.abs(n_pos - a_pos) <= 500) and np.all(n_pos != a_pos)
  assert np.all(n_pos >= 0) and np.all(n_pos + 300 <= np.array([s.timelines[i].length for i in n_tl]))
  # Anchors are not on a grid.
  assert len(np.unique(a_pos % 300)) > 50


def test_distant_tiles_come_from_another_session_or_recording(feats):
  s = make(feats)
  t = s.sample(1, 512)
  groups = np.array([s.timelines[i].group for i in range(len(s.timelines))])
  assert np.all(groups[t['anchor'][0]] != groups[t['distant'][0]])
  s2 = make(feats, distant_other_group=False)
  t2 = s2.sample(1, 512)
  recordings = np.array([tl.recording for tl in s2.timelines])
  assert np.all(recordings[t2['anchor'][0]] != recordings[t2['distant'][0]])


def test_same_session_distant_tiles_happen_only_when_allowed(feats):
  # Two nodes of one session: with recordings as the only constraint, distant tiles may share the session.
  clips = [c for c in feats.clips if c.group in ('absence_0', 'absence_1')]
  twin = [dataclasses.replace(c, recording=c.recording + '_node2') for c in clips]
  s = TripletSampler(clips + twin, tile_frames=300, neighbour_frames=500, distant_other_group=False, seed=0)
  t = s.sample(0, 256)
  groups = np.array([tl.group for tl in s.timelines])
  assert np.any(groups[t['anchor'][0]] == groups[t['distant'][0]])
  s = TripletSampler(clips + twin, tile_frames=300, neighbour_frames=500, distant_other_group=True, seed=0)
  t = s.sample(0, 256)
  groups = np.array([tl.group for tl in s.timelines])
  assert np.all(groups[t['anchor'][0]] != groups[t['distant'][0]])


def test_batches_are_a_function_of_seed_and_step(feats):
  a, b = make(feats).sample(7, 64), make(feats).sample(7, 64)
  for role in ROLES:
    for x, y in zip(a[role], b[role]):
      np.testing.assert_array_equal(x, y)
  assert not np.array_equal(make(feats).sample(8, 64)['anchor'][1], a['anchor'][1])
  assert not np.array_equal(make(feats, seed=4).sample(7, 64)['anchor'][1], a['anchor'][1])


def test_neighbours_cross_consecutive_clips_only_when_enabled(feats):
  crossing = make(feats, cross_clip_neighbours=True)
  assert max(len(t.clips) for t in crossing.timelines) == 2  # The test set's sessions are 2 consecutive clips.
  t = crossing.sample(0, 512)
  spans = [len(crossing.pieces(tl, pos)) for tl, pos in zip(*t['neighbour'])]
  assert 2 in spans
  single = make(feats, cross_clip_neighbours=False)
  assert all(len(tl.clips) == 1 for tl in single.timelines)
  t = single.sample(0, 512)
  assert all(len(single.pieces(tl, pos)) == 1 for tl, pos in zip(*t['neighbour']))


def exact_distribution(s: TripletSampler):
  """By enumeration: P(neighbour offset = d), P(the neighbour tile spans two clips), P(distant timeline = j)."""
  offsets, crossing, distant = collections.Counter(), 0.0, np.zeros(len(s.timelines))
  total = int(s.valid.sum())
  owner = np.array([t.group if s.distant_other_group else t.recording for t in s.timelines])
  for i, t in enumerate(s.timelines):
    valid = int(s.valid[i])
    others = owner != owner[i]
    distant += valid / total * others * s.valid / (s.valid * others).sum()
    boundaries = np.array(t.starts[1:])
    for a in range(valid):
      lo, hi = max(a - s.neighbour_frames, 0), min(a + s.neighbour_frames, valid - 1)
      choices = np.array([n for n in range(lo, hi + 1) if n != a] or [a])
      p = 1.0 / total / len(choices)
      for d in choices - a:
        offsets[int(d)] += p
      spans = ((choices[:, None] < boundaries) & (choices[:, None] + s.tile_frames > boundaries)).any(axis=1)
      crossing += p * spans.sum()
  return offsets, crossing, distant


def test_draws_follow_the_exact_distribution(feats):
  """Offsets, the share of neighbours across a clip boundary and the distant timeline, against enumeration."""
  clips = [c for c in feats.clips if c.group in ('absence_0', 'absence_1', 'dishwashing_0')]
  s = TripletSampler(clips, tile_frames=800, neighbour_frames=60, seed=5)
  offsets, crossing, distant = exact_distribution(s)
  draws = [s.sample(step, 4096) for step in range(12)]
  n = 12 * 4096
  cat = lambda role, i: np.concatenate([d[role][i] for d in draws])
  a_tl, a_pos, n_pos, d_tl = cat('anchor', 0), cat('anchor', 1), cat('neighbour', 1), cat('distant', 0)
  observed = collections.Counter((n_pos - a_pos).tolist())
  # Offsets in bins of 10 frames, against 4 standard errors of a binomial proportion.
  for lo in range(-60, 61, 10):
    p = sum(v for k, v in offsets.items() if lo <= k < lo + 10)
    q = sum(v for k, v in observed.items() if lo <= k < lo + 10) / n
    assert abs(q - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9, (lo, p, q)
  crosses = np.mean([len(s.pieces(tl, pos)) > 1 for tl, pos in zip(a_tl, n_pos)])
  assert crossing > 0.05 and abs(crosses - crossing) <= 4 * np.sqrt(crossing * (1 - crossing) / n)
  seen = np.bincount(d_tl, minlength=len(s.timelines)) / n
  np.testing.assert_allclose(seen, distant, atol=4 * np.sqrt(distant.max() / n))
  groups = np.array([t.group for t in s.timelines])
  assert np.all(groups[a_tl] != groups[d_tl])


def test_packed_tiles_are_the_clips_joined(feats, packed):
  s, frames = packed
  assert frames.dtype == np.float16 and frames.shape == (s.total_frames, feats.n_mels)
  tl = next(i for i, t in enumerate(s.timelines) if len(t.clips) == 2)
  first, second = s.timelines[tl].clips
  pos = first.num_frames - 100
  row = int(s.tables.row_offset[tl]) + pos
  expected = np.concatenate([feats.read(first.clip_id, pos), feats.read(second.clip_id, 0, 200)])
  np.testing.assert_array_equal(frames[row:row + 300].astype(np.float32), expected)


@pytest.mark.parametrize('mode', ['jit', 'pmap'])
def test_device_and_host_stores_cut_the_same_tiles(packed, mode):
  """The step's tiles cut on 4 devices from the placed store equal the host loader's, step for step."""
  s, frames = packed
  parallel = DataParallel(mode, devices=jax.devices()[:4])
  batch_fn = input_pipeline.device_batch_fn(parallel, batch_size=8, tile_frames=300, neighbour_frames=500)
  data = parallel.put_replicated((frames, s.tables, s.data_key))
  if mode == 'pmap':
    cut = jax.pmap(lambda d, step: batch_fn(d, step, 0), axis_name='batch', in_axes=(0, None),
                   devices=jax.devices()[:4])
  else:
    cut = jax.jit(lambda d, step: batch_fn(d, step, 0))
  host = input_pipeline.HostTileLoader(frames, s, 8, 2)
  for step in (0, 5):
    on_device = jax.device_get(cut(data, np.int32(step)))
    expected = host.cut(step, 1)
    for role in ROLES:
      got = on_device[role].reshape((8,) + on_device[role].shape[-2:])
      assert got.dtype == np.float16
      np.testing.assert_array_equal(got, expected[role][0])
  host.close()


def test_process_shares_make_up_the_global_batch(packed):
  s, frames = packed
  whole = input_pipeline.HostTileLoader(frames, s, 8, 1).cut(5, 1)
  shares = [input_pipeline.HostTileLoader(frames, s, 8, 1, share=input_pipeline.Share(p, 2)).cut(5, 1)
            for p in range(2)]
  for role in ROLES:
    assert whole[role].shape == (1, 8, 300, 128)
    np.testing.assert_array_equal(np.concatenate([sh[role] for sh in shares], axis=1), whole[role])


def test_host_loader_prepares_the_calls_ahead(packed):
  s, frames = packed
  put_calls = []
  loader = input_pipeline.HostTileLoader(frames, s, 8, 2, put=lambda b: put_calls.append(1) or b)
  first = loader.get(0, 2, ahead=[(2, 2), (4, 1)])
  second = loader.get(2, 2, ahead=[(4, 1)])
  loader.close()
  assert len(put_calls) == 3  # The call for step 4 was prepared although never asked for.
  np.testing.assert_array_equal(second['anchor'][:2], loader.cut(2, 2)['anchor'][:2])
  np.testing.assert_array_equal(first['distant'][:2], loader.cut(0, 2)['distant'][:2])


def test_store_choice_follows_the_memory_and_names_the_fix():
  cpu = jax.devices()[:2]
  store, sizes = input_pipeline.choose_store('auto', 1 << 20, cpu, 0.5)
  assert store == 'device' and 'GiB' in sizes
  host = input_pipeline.host_memory_bytes()
  # Two CPU devices hold two copies: more than half the memory, so host memory, unless that too is exceeded.
  assert input_pipeline.choose_store('auto', int(0.3 * host), cpu, 0.5, 0.5)[0] == 'host'
  assert input_pipeline.choose_store('auto', int(0.6 * host), cpu, 0.5, 0.5)[0] == 'stream'
  assert input_pipeline.choose_store('auto', 1 << 50, cpu, 0.5)[0] == 'stream'
  assert input_pipeline.choose_store('stream', 1 << 20, cpu, 0.5)[0] == 'stream'
  assert input_pipeline.choose_store('host', 1 << 20, cpu, 0.5)[0] == 'host'
  with pytest.raises(input_pipeline.StoreError, match=r"store='host'.*device_memory_fraction"):
    input_pipeline.choose_store('device', 1 << 50, cpu, 0.5)
  with pytest.raises(input_pipeline.StoreError, match='config.data.store'):
    input_pipeline.choose_store('gpu', 1, cpu, 0.5)


def test_tile_longer_than_every_recording_fails_with_the_fix(feats):
  with pytest.raises(SamplerError, match='tile_seconds'):
    make(feats, tile_frames=5000)


def test_one_session_only_fails_with_the_fix(feats):
  clips = [c for c in feats.clips if c.group == 'absence_0']
  with pytest.raises(SamplerError, match='distant_other_group'):
    TripletSampler(clips, tile_frames=300, neighbour_frames=100)


@pytest.mark.parametrize('value', [np.inf, -np.inf, np.nan])
def test_packing_refuses_non_finite_frames_naming_the_clip(feats, store_with_value, value):
  s = make(feats)
  victim = s.timelines[3].clips[-1]
  damaged = open_features(store_with_value(feats.root, victim.frame_offset + 7, 5, value))
  with pytest.raises(input_pipeline.StoreError, match=f'clip {victim.clip_id} .*non-finite'):
    input_pipeline.pack_timelines(damaged, s)


def test_packing_reads_straight_into_the_packed_array_in_pieces(feats, monkeypatch):
  """Clips that lie next to each other in the store are read together, in pieces of at most READ_PIECE_BYTES, each
  into its rows of the packed array itself: never the whole split into a temporary (which doubled packing's memory)."""
  s = make(feats)
  monkeypatch.setattr(input_pipeline, 'READ_PIECE_BYTES', 600 * 2 * feats.n_mels)
  seen = {}
  real = input_pipeline.read_rows

  def recording(array, reads, out, **kw):
    seen['reads'], seen['out'] = list(reads), out
    return real(array, seen['reads'], out, **kw)

  monkeypatch.setattr(input_pipeline, 'read_rows', recording)
  packed = input_pipeline.pack_timelines(feats, s)
  assert seen['out'] is packed
  counts = [count for _, count, _ in seen['reads']]
  assert max(counts) == 600 and sum(counts) == s.total_frames
  ends = {c.frame_offset + c.num_frames for c in feats.clips}
  # Some read runs past the end of the clip it starts in: neighbouring clips were merged before cutting.
  assert any(any(offset < e < offset + count for e in ends) for offset, count, _ in seen['reads'])
  for timeline, offset in zip(s.timelines[:4], s.tables.row_offset[:4]):
    clip = timeline.clips[0]
    np.testing.assert_array_equal(packed[int(offset):int(offset) + clip.num_frames],
                                  np.asarray(feats.read_stored(clip.frame_offset, clip.num_frames).result()))


def test_a_float32_store_packs_to_the_float16_of_its_values(feats, tmp_path):
  root = str(tmp_path / 'float32')
  shutil.copytree(feats.root, root, ignore=shutil.ignore_patterns('features.zarr'))
  stored = np.asarray(feats.open_array().read().result())
  spec = features_lib.array_spec(os.path.join(root, 'features.zarr'), num_frames=len(stored), n_mels=feats.n_mels,
                                 dtype='float32', chunk_frames=256, shard_frames=4096, compression='zstd')
  ts.open(spec, create=True).result().write(stored.astype(np.float32) + np.float32(1e-4)).result()
  record_store_files(root)
  s = make(feats)
  packed = input_pipeline.pack_timelines(open_features(root), s)
  expected = input_pipeline.pack_timelines(feats, s).astype(np.float32) + np.float32(1e-4)
  assert packed.dtype == np.float16
  np.testing.assert_array_equal(packed, expected.astype(np.float16))


def test_a_chunk_of_zeros_is_stored_so_strict_reads_find_it(tmp_path):
  """Stores are read with fill_missing_data_reads=False (a missing chunk is damage); tensorstore would otherwise leave
  out a chunk equal to the fill value, and a strict read of silence would fail."""
  path = str(tmp_path / 'zarr')
  spec = features_lib.array_spec(path, num_frames=2048, n_mels=4, dtype='float16', chunk_frames=512,
                                 shard_frames=2048, compression='zstd')
  frames = np.ones((2048, 4), np.float16)
  frames[512:1024] = 0
  ts.open(spec, create=True).result().write(frames).result()
  strict = ts.open({'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': path}, 'fill_missing_data_reads': False},
                   read=True).result()
  np.testing.assert_array_equal(strict.read().result(), frames)
