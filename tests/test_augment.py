"""The label-free tile augmentations: band shifts, mixing in power, and their settings."""

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
  with pytest.raises(ValueError, match=r'config.data.augment.freq_shift=-1'):
    augment.make_augment(freq_shift=-1)
  with pytest.raises(ValueError, match=r'config.data.augment.freq_shift=1.5'):
    augment.make_augment(freq_shift=1.5)
  with pytest.raises(ValueError, match=r'config.data.augment.mixup=1.0 must lie in \[0, 1\)'):
    augment.make_augment(mixup=1.0)
