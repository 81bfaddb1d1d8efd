"""The label-free tile augmentations: band shifts, mixing in power, gain curves, time stretches, rooms, low-pass
edges, their settings."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dem_jax import augment


def test_shift_bands_moves_each_tile_by_its_own_shift_and_repeats_the_edge():
  tiles = np.tile(np.arange(8, dtype=np.float32), (3, 2, 1))  # [3, 2, 8], band m holds m
  out = np.asarray(augment.shift_bands(jnp.asarray(tiles), jnp.array([0, 2, -3])))
  np.testing.assert_array_equal(out[0], tiles[0])
  np.testing.assert_array_equal(out[1, 0], [0, 0, 0, 1, 2, 3, 4, 5])  # up by 2: the lowest band repeats
  np.testing.assert_array_equal(out[2, 1], [3, 4, 5, 6, 7, 7, 7, 7])  # down by 3: the highest band repeats


def test_mix_in_power_matches_the_formula_and_keeps_the_dtype():
  rng = np.random.default_rng(0)
  x, y = rng.normal(-4, 3, (2, 5, 6)), rng.normal(-4, 3, (2, 5, 6))
  a = np.array([0.0, 0.3])
  out = augment.mix_in_power(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), jnp.asarray(a))
  expected = np.log((1 - a[:, None, None]) * np.exp(x) + a[:, None, None] * np.exp(y))
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out[0]), x[0], atol=1e-6)  # a = 0: unchanged
  # Very loud or quiet levels stay finite, and a float16 batch stays float16.
  loud = augment.mix_in_power(jnp.full((1, 2, 2), 80.0, jnp.float16), jnp.full((1, 2, 2), -80.0, jnp.float16),
                              jnp.array([0.5]))
  assert loud.dtype == jnp.float16 and np.allclose(np.asarray(loud, np.float32), 80 + np.log(0.5), atol=0.1)


def test_equalise_adds_a_curve_straight_between_the_knots_in_decibels():
  tiles = np.zeros((2, 3, 9), np.float32)
  knots = jnp.array([[20.0] * 5, [-20.0, 0.0, 0.0, 0.0, 20.0]])  # 5 knots over 9 bands: one every 2 bands
  out = np.asarray(augment.equalise(jnp.asarray(tiles), knots))
  np.testing.assert_allclose(out[0], np.log(10.0), rtol=1e-6)  # +20 dB in magnitude is x10: ln 10 in log-Mel
  expected_db = np.array([-20, -10, 0, 0, 0, 0, 0, 10, 20])
  np.testing.assert_allclose(out[1, 2], expected_db / 20 * np.log(10.0), atol=1e-6)
  assert augment.equalise(jnp.zeros((1, 2, 9), jnp.float16), knots[:1]).dtype == jnp.float16


def test_stretch_time_resamples_a_window_to_the_tile_length():
  tiles = np.tile(np.arange(11, dtype=np.float32)[None, :, None], (3, 1, 2))  # frame t holds t
  out = np.asarray(augment.stretch_time(jnp.asarray(tiles), jnp.array([11.0, 6.0, 3.0]), jnp.array([0.0, 2.0, 7.5])))
  np.testing.assert_allclose(out[0], tiles[0], atol=1e-6)  # the whole tile: unchanged
  np.testing.assert_allclose(out[1, :, 0], np.linspace(2, 7, 11), atol=1e-5)  # frames 2..7 over 11 frames
  np.testing.assert_allclose(out[2, :, 1], np.linspace(7.5, 9.5, 11), atol=1e-5)  # between frames, interpolated


def test_reverberate_adds_a_fading_tail_after_a_sound_and_nothing_before_it():
  tiles = np.full((3, 12, 2), -20.0, np.float32)  # near silence, then one loud frame
  tiles[:, 4] = 0.0
  decay, level = jnp.array([0.5, 0.5, 0.5]), jnp.array([1.0, 0.0, 0.2])
  out = np.asarray(augment.reverberate(jnp.asarray(tiles), decay, level))
  silence = np.asarray(augment.reverberate(jnp.full((3, 12, 2), -20.0), decay, level))
  np.testing.assert_allclose(out[:, :4], silence[:, :4], atol=1e-5)  # the frames before do not hear the sound
  np.testing.assert_allclose(out[:, 4], 0.0, atol=1e-5)
  np.testing.assert_allclose(out[1], tiles[1], atol=1e-5)  # level 0: no room
  # After the sound, magnitude (1 - d) d^lag times the level: a straight fall of log(0.5) per frame.
  np.testing.assert_allclose(out[0, 5:9, 0], np.log(0.5 * 0.5 ** np.arange(1, 5)), atol=1e-3)
  assert out[2, 5, 0] == pytest.approx(np.log(0.2 * 0.25), abs=1e-3)
  assert augment.reverberate(jnp.asarray(tiles, jnp.float16), jnp.full(3, 0.5), jnp.ones(3)).dtype == jnp.float16


def test_cut_high_bands_drops_the_bands_above_the_edge_to_the_tiles_floor():
  tiles = np.tile(np.linspace(-3.0, 3.0, 20, dtype=np.float32), (2, 4, 1))  # [2, 4, 20]
  tiles[:, 0, 0] = -5.0  # the tile's quietest value
  out = np.asarray(augment.cut_high_bands(jnp.asarray(tiles), jnp.array([10.0, 19.0])))
  np.testing.assert_allclose(out[:, :, :11], tiles[:, :, :11])  # at and below the edge: unchanged
  # From 4 bands above it: 60 dB down (x1/1000 in magnitude), held at the floor.
  np.testing.assert_allclose(out[0, :, 14:], np.maximum(tiles[0, :, 14:] - np.log(1000.0), -5.0), rtol=1e-5)
  assert (out[0, :, 14:] == -5.0).any() and (out[0, :, 14:] > -5.0).any()
  assert (out[0, :, 11:14] < tiles[0, :, 11:14]).all()  # the slope between
  np.testing.assert_allclose(out[1, :, :20], tiles[1, :, :20])  # an edge at the top band cuts nothing


def test_rooms_and_low_pass_edges_are_drawn_per_tile():
  fn = augment.make_augment(reverb=0.5, low_pass=0.4, frame_rate=100.0)
  rng = np.random.default_rng(2)
  batch = {r: jnp.asarray(rng.normal(-4, 2, size=(8, 50, 32)), jnp.float32) for r in ('anchor', 'neighbour')}
  out = jax.jit(fn)(batch, jax.random.key(0))
  for role in batch:
    assert out[role].shape == batch[role].shape and np.isfinite(np.asarray(out[role])).all()
    assert not np.array_equal(np.asarray(out[role]), np.asarray(batch[role]))
  with pytest.raises(ValueError, match=r'config.data.augment.reverb=-1 must be a finite reverberation time'):
    augment.make_augment(reverb=-1)
  with pytest.raises(ValueError, match=r'config.data.augment.low_pass=1.0 must lie in \[0, 1\)'):
    augment.make_augment(low_pass=1.0)


def test_augment_draws_per_tile_and_role_and_repeats_with_the_key():
  fn = augment.make_augment(freq_shift=3, mixup=0.4)
  rng = np.random.default_rng(1)
  batch = {r: jnp.asarray(rng.normal(size=(16, 10, 32)), jnp.float16) for r in ('anchor', 'neighbour', 'distant')}
  out = jax.jit(fn)(batch, jax.random.key(0))
  again = jax.jit(fn)(batch, jax.random.key(0))
  other = jax.jit(fn)(batch, jax.random.key(1))
  for role in batch:
    assert out[role].shape == batch[role].shape and out[role].dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(out[role]), np.asarray(again[role]))
    assert not np.array_equal(np.asarray(out[role]), np.asarray(other[role]))
    assert not np.array_equal(np.asarray(out[role]), np.asarray(batch[role]))
  # The anchor and the neighbour get different draws, even from equal tiles.
  same = {'anchor': batch['anchor'], 'neighbour': batch['anchor'], 'distant': batch['distant']}
  out = fn(same, jax.random.key(0))
  assert not np.array_equal(np.asarray(out['anchor']), np.asarray(out['neighbour']))


def test_augment_off_is_none_and_bad_settings_name_the_setting():
  assert augment.make_augment() is None and augment.make_augment(freq_shift=0, mixup=0.0) is None
  # SETTINGS, which errors list, are the settings make_augment takes.
  takes = inspect.signature(augment.make_augment).parameters
  assert tuple(name for name in takes if name != 'frame_rate') == augment.SETTINGS
  with pytest.raises(ValueError, match=r'config.data.augment.freq_shift=-1'):
    augment.make_augment(freq_shift=-1)
  with pytest.raises(ValueError, match=r'config.data.augment.freq_shift=1.5'):
    augment.make_augment(freq_shift=1.5)
  with pytest.raises(ValueError, match=r'config.data.augment.mixup=1.0 must lie in \[0, 1\)'):
    augment.make_augment(mixup=1.0)
  for gain in (-3, float('inf'), float('nan')):
    with pytest.raises(ValueError, match=rf'config.data.augment.eq_db={gain} must be a finite number of decibels'):
      augment.make_augment(eq_db=gain)
  with pytest.raises(ValueError, match=r'config.data.augment.time_stretch=1.0 must lie in \[0, 1\)'):
    augment.make_augment(time_stretch=1.0)
  for bands in (-2, 2.5):
    with pytest.raises(ValueError, match=rf'config.data.augment.freq_mask={bands} must be a whole number of mel bands'):
      augment.make_augment(freq_mask=bands)
  with pytest.raises(ValueError, match=r'config.data.augment.time_mask=1.0 must lie in \[0, 1\)'):
    augment.make_augment(time_mask=1.0)


def test_mask_span_sets_the_span_to_the_tile_mean_and_nothing_else():
  tiles = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6)
  bands = np.asarray(augment.mask_span(jnp.asarray(tiles), 2, jnp.array([1, 0]), jnp.array([3, 0])))
  np.testing.assert_array_equal(bands[0, :, 1:4], np.full((4, 3), tiles[0].mean()))
  np.testing.assert_array_equal(bands[0, :, [0, 4, 5]], tiles[0, :, [0, 4, 5]])
  np.testing.assert_array_equal(bands[1], tiles[1])  # width 0: untouched
  frames = np.asarray(augment.mask_span(jnp.asarray(tiles), 1, jnp.array([3, 0]), jnp.array([1, 2])))
  np.testing.assert_array_equal(frames[0, 3], np.full(6, tiles[0].mean()))
  np.testing.assert_array_equal(frames[0, :3], tiles[0, :3])
  np.testing.assert_array_equal(frames[1, :2], np.full((2, 6), tiles[1].mean()))
  np.testing.assert_array_equal(frames[1, 2:], tiles[1, 2:])
  assert augment.mask_span(jnp.asarray(tiles, jnp.bfloat16), 1, jnp.array([0, 0]), jnp.array([1, 1])).dtype == \
      jnp.bfloat16


@pytest.mark.parametrize('axis,setting,most', [(2, {'freq_mask': 5}, 5), (1, {'time_mask': 0.25}, 5)])
def test_masks_cover_at_most_their_span_of_adjacent_rows(axis, setting, most):
  rng = np.random.default_rng(4)
  batch = {r: jnp.asarray(rng.normal(size=(32, 20, 16)), jnp.float32) for r in ('anchor', 'neighbour', 'distant')}
  out = augment.make_augment(**setting)(batch, jax.random.key(5))
  widths = []
  for role in batch:
    x, y = np.asarray(batch[role]), np.asarray(out[role])
    changed = np.any(x != y, axis=3 - axis)  # [B, n]: the frames (axis 1) or bands (axis 2) that were masked
    for tile in range(len(x)):
      where = np.flatnonzero(changed[tile])
      widths.append(len(where))
      if len(where):
        assert where[-1] - where[0] + 1 == len(where)  # one run of adjacent rows
        span = y[tile][:, where] if axis == 2 else y[tile][where]
        np.testing.assert_allclose(span, x[tile].mean(), atol=1e-6)
  assert max(widths) == most and min(widths) == 0 and len(set(widths)) > 2


@pytest.mark.parametrize('setting', [{'eq_db': 6.0}, {'time_stretch': 0.3}, {'freq_mask': 6}, {'time_mask': 0.3}])
def test_each_new_setting_alone_changes_the_tiles_and_leaves_the_band_shift_draws_alone(setting):
  rng = np.random.default_rng(2)
  batch = {r: jnp.asarray(rng.normal(size=(8, 20, 16)), jnp.float32) for r in ('anchor', 'neighbour', 'distant')}
  out = augment.make_augment(**setting)(batch, jax.random.key(3))
  for role in batch:
    assert out[role].shape == batch[role].shape
    assert not np.allclose(np.asarray(out[role]), np.asarray(batch[role]))
  # Turning a later setting on keeps the band shifts an earlier run drew: a gain curve moves every band of a tile
  # by a smooth amount, so the shift per tile is still read off as the offset that best lines the bands up.
  if 'eq_db' in setting:
    ramp = {r: jnp.asarray(np.tile(np.arange(16.0) * 100, (8, 20, 1)), jnp.float32) for r in batch}
    shifted = augment.make_augment(freq_shift=3)(ramp, jax.random.key(3))
    both = augment.make_augment(freq_shift=3, **setting)(ramp, jax.random.key(3))
    for role in ramp:
      np.testing.assert_array_equal(np.round(np.asarray(both[role]) / 100), np.round(np.asarray(shifted[role]) / 100))
  # A mask comes after the shift: outside its span the tile is the shifted one, inside it the shifted tile's mean.
  if 'freq_mask' in setting or 'time_mask' in setting:
    shifted = augment.make_augment(freq_shift=3)(batch, jax.random.key(3))
    both = augment.make_augment(freq_shift=3, **setting)(batch, jax.random.key(3))
    for role in batch:
      s, b = np.asarray(shifted[role]), np.asarray(both[role])
      masked = s != b
      assert masked.any()
      np.testing.assert_allclose(b[masked], np.broadcast_to(s.mean(axis=(1, 2), keepdims=True), s.shape)[masked],
                                 atol=1e-6)
