import numpy as np
import pytest

from dem_jax.features import open_features
from dem_jax.input_pipeline import TripletLoader
from dem_jax.sampler import SamplerError, TripletSampler, read_tiles


@pytest.fixture(scope='module')
def feats(dcase_features):
  return open_features(dcase_features)


def make(feats, **kw):
  args = dict(tile_frames=300, neighbour_frames=500, cross_clip_neighbours=True, distant_other_group=True, seed=3)
  return TripletSampler(feats.clips, **(args | kw))


def test_neighbour_lies_within_the_window_of_the_same_recording(feats):
  s = make(feats)
  t = s.sample(0, 512)
  (a_tl, a_pos), (n_tl, n_pos) = t.anchor, t.neighbour
  assert np.array_equal(a_tl, n_tl)
  assert np.all(np.abs(n_pos - a_pos) <= 500) and np.all(n_pos != a_pos)
  assert np.all(n_pos >= 0) and np.all(n_pos + 300 <= np.array([s.timelines[i].length for i in n_tl]))
  # Anchors are not on a grid.
  assert len(np.unique(a_pos % 300)) > 50


def test_distant_tiles_come_from_another_session_or_recording(feats):
  s = make(feats)
  t = s.sample(1, 512)
  groups = np.array([s.timelines[i].group for i in range(len(s.timelines))])
  assert np.all(groups[t.anchor[0]] != groups[t.distant[0]])
  s2 = make(feats, distant_other_group=False)
  t2 = s2.sample(1, 512)
  recordings = np.array([tl.recording for tl in s2.timelines])
  assert np.all(recordings[t2.anchor[0]] != recordings[t2.distant[0]])


def test_same_session_distant_tiles_happen_only_when_allowed(feats):
  # Two nodes of one session: with recordings as the only constraint, distant tiles may share the session.
  clips = [c for c in feats.clips if c.group in ('absence_0', 'absence_1')]
  import dataclasses
  twin = [dataclasses.replace(c, recording=c.recording + '_node2') for c in clips]
  s = TripletSampler(clips + twin, tile_frames=300, neighbour_frames=500, distant_other_group=False, seed=0)
  t = s.sample(0, 256)
  groups = np.array([tl.group for tl in s.timelines])
  assert np.any(groups[t.anchor[0]] == groups[t.distant[0]])
  s = TripletSampler(clips + twin, tile_frames=300, neighbour_frames=500, distant_other_group=True, seed=0)
  t = s.sample(0, 256)
  groups = np.array([tl.group for tl in s.timelines])
  assert np.all(groups[t.anchor[0]] != groups[t.distant[0]])


def test_batches_are_a_function_of_seed_and_step(feats):
  a, b = make(feats).sample(7, 64), make(feats).sample(7, 64)
  for role in ('anchor', 'neighbour', 'distant'):
    for x, y in zip(getattr(a, role), getattr(b, role)):
      np.testing.assert_array_equal(x, y)
  assert not np.array_equal(make(feats).sample(8, 64).anchor[1], a.anchor[1])
  assert not np.array_equal(make(feats, seed=4).sample(7, 64).anchor[1], a.anchor[1])


def test_neighbours_cross_consecutive_clips_only_when_enabled(feats):
  crossing = make(feats, cross_clip_neighbours=True)
  assert max(len(t.clips) for t in crossing.timelines) == 2  # The test set's sessions are 2 consecutive clips.
  t = crossing.sample(0, 512)
  spans = [len(crossing.pieces(tl, pos)) for tl, pos in zip(*t.neighbour)]
  assert 2 in spans
  single = make(feats, cross_clip_neighbours=False)
  assert all(len(tl.clips) == 1 for tl in single.timelines)
  t = single.sample(0, 512)
  assert all(len(single.pieces(tl, pos)) == 1 for tl, pos in zip(*t.neighbour))


def test_tiles_read_across_a_clip_boundary_are_the_two_clips_joined(feats):
  s = make(feats)
  tl = next(i for i, t in enumerate(s.timelines) if len(t.clips) == 2)
  first, second = s.timelines[tl].clips
  pos = first.num_frames - 100
  tile = read_tiles(feats, s, np.array([tl]), np.array([pos]))[0]
  expected = np.concatenate([feats.read(first.clip_id, pos), feats.read(second.clip_id, 0, 200)])
  np.testing.assert_array_equal(tile, expected)


def test_tile_longer_than_every_recording_fails_with_the_fix(feats):
  with pytest.raises(SamplerError, match='tile_seconds'):
    make(feats, tile_frames=5000)


def test_one_session_only_fails_with_the_fix(feats):
  clips = [c for c in feats.clips if c.group == 'absence_0']
  with pytest.raises(SamplerError, match='distant_other_group'):
    TripletSampler(clips, tile_frames=300, neighbour_frames=100)


def test_process_shares_make_up_the_global_batch(feats):
  s = make(feats)
  with TripletLoader(feats, s, 8, prefetch=2) as whole:
    full = whole.batch(5)
  shares = []
  for p in range(2):
    with TripletLoader(feats, s, 8, process_index=p, process_count=2, prefetch=0) as loader:
      shares.append(loader.batch(5))
  for role in ('anchor', 'neighbour', 'distant'):
    assert full[role].shape == (8, 300, 128)
    np.testing.assert_array_equal(np.concatenate([sh[role] for sh in shares]), full[role])
