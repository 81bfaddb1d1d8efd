"""Triplet losses against values worked out by hand."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dem_jax import losses

# Two triplets in 2-D:
#  1: a=(1,0) n=(0,1) d=(-1,0): |a-n|^2 = 2, |a-d|^2 = 4 -> hinge max(0, 2 - 4 + 1) = 0 (solved)
#  2: a=(1,0) n=(-1,0) d=(0,1): |a-n|^2 = 4, |a-d|^2 = 2 -> hinge 4 - 2 + 1 = 3 (active)
A = jnp.array([[1., 0.], [1., 0.]])
N = jnp.array([[0., 1.], [-1., 0.]])
D = jnp.array([[-1., 0.], [0., 1.]])


def test_triplet_loss_averages_over_active_triplets_only():
  loss, m = losses.triplet_loss(A, N, D, margin=1.0)
  assert float(loss) == pytest.approx(3.0)  # 3 / 1 active triplet, not 3 / 2.
  assert float(m['loss']) == pytest.approx(3.0)
  assert float(m['active_fraction']) == pytest.approx(0.5)
  assert float(m['d_pos']) == pytest.approx(3.0)  # mean of 2 and 4
  assert float(m['d_neg']) == pytest.approx(3.0)  # mean of 4 and 2
  assert float(m['embedding_norm']) == pytest.approx(1.0)


def test_triplet_margin_moves_the_hinge():
  # margin 3: hinges max(0, 2 - 4 + 3) = 1 and 4 - 2 + 3 = 5, both active -> mean 3.
  loss, m = losses.triplet_loss(A, N, D, margin=3.0)
  assert float(loss) == pytest.approx(3.0)
  assert float(m['active_fraction']) == 1.0


def test_triplet_loss_is_zero_with_zero_gradient_when_all_solved():
  loss, m = losses.triplet_loss(A[:1], N[:1], D[:1], margin=1.0)
  assert float(loss) == 0.0 and float(m['active_fraction']) == 0.0
  g = jax.grad(lambda a: losses.triplet_loss(a, N[:1], D[:1])[0])(A[:1])
  np.testing.assert_array_equal(g, 0.0)


def test_triplet_gradient_by_hand():
  # Only triplet 2 is active: d/da (|a-n|^2 - |a-d|^2) = 2(a-n) - 2(a-d) = 2(d-n) = 2((0,1) - (-1,0)) = (2, 2).
  g = jax.grad(lambda a: losses.triplet_loss(a, N, D)[0])(A)
  np.testing.assert_allclose(g, [[0., 0.], [2., 2.]])


def test_triplet_loss_with_axis_name_averages_over_the_global_batch():
  # Four triplets on two "devices" with 1 and 2 active triplets: a mean of per-device means would give
  # (3/1 + (3+5)/2) / 2 = 3.5, the global mean over active triplets is (3 + 3 + 5) / 3 = 11/3.
  za = jnp.array([[1., 0.], [1., 0.], [1., 0.], [1., 0.]])
  zn = jnp.array([[0., 1.], [-1., 0.], [-1., 0.], [-1., 0.]])
  zd = jnp.array([[-1., 0.], [0., 1.], [0., 1.], [1., 0.]])  # the last: 4 - 0 + 1 = 5
  full, _ = losses.triplet_loss(za, zn, zd)
  assert float(full) == pytest.approx(11 / 3)
  per_device = jax.vmap(functools.partial(losses.triplet_loss, axis_name='i'), axis_name='i')
  split = lambda x: x.reshape(2, 2, 2)
  loss, metrics = per_device(split(za), split(zn), split(zd))
  assert float(jnp.mean(loss)) == pytest.approx(11 / 3)
  assert float(jnp.mean(metrics['active_fraction'])) == pytest.approx(0.75)
  # The gradient, averaged over devices as the step does, is the single-device gradient.
  g_full = jax.grad(lambda a: losses.triplet_loss(a, zn, zd)[0])(za)
  g_split = jax.grad(lambda a: jnp.mean(per_device(a, split(zn), split(zd))[0]))(split(za))
  np.testing.assert_allclose(g_split.reshape(4, 2), g_full, rtol=1e-6)


def test_tile2vec_loss_uses_plain_distances_and_norm_penalty():
  # |a-n| - |a-d| + 1: triplet 1: sqrt2 - 2 + 1 = 0.414, triplet 2: 2 - sqrt2 + 1 = 1.586; both active.
  # Every embedding has norm 1, so the penalty is l2 * 3.
  loss, m = losses.tile2vec_loss(A, N, D, margin=1.0, l2=0.1)
  expected = np.mean([np.sqrt(2) - 2 + 1, 2 - np.sqrt(2) + 1]) + 0.1 * 3.0
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert float(m['active_fraction']) == 1.0
  assert float(m['d_pos']) == pytest.approx((np.sqrt(2) + 2) / 2, rel=1e-6)
  assert float(m['embedding_norm']) == pytest.approx(1.0)


def test_tile2vec_penalty_scales_with_embedding_norms():
  loss_1, _ = losses.tile2vec_loss(A, N, D, margin=0.0, l2=1.0)
  loss_2, m = losses.tile2vec_loss(2 * A, 2 * N, 2 * D, margin=0.0, l2=1.0)
  # margin 0: hinges 0 and 2 - sqrt2 (doubled at twice the scale); penalties 3 and 6.
  assert float(loss_1) == pytest.approx((2 - np.sqrt(2)) / 2 + 3.0, rel=1e-6)
  assert float(loss_2) == pytest.approx((2 - np.sqrt(2)) + 6.0, rel=1e-6)
  assert float(m['embedding_norm']) == pytest.approx(2.0)


def test_tile2vec_gradient_is_finite_when_anchor_equals_neighbour():
  g = jax.grad(lambda a: losses.tile2vec_loss(a, a, D, margin=1.0)[0])(A)
  assert np.all(np.isfinite(np.asarray(g)))


def test_get_loss_fn_binds_settings_and_drops_the_other_losses():
  triplet = losses.get_loss_fn('triplet', margin=3.0, l2=0.5)  # l2 belongs to tile2vec: ignored here.
  assert float(triplet(A, N, D)[0]) == pytest.approx(3.0)
  tile2vec = losses.get_loss_fn('tile2vec', margin=1.0, l2=0.1)
  assert float(tile2vec(A, N, D)[0]) == pytest.approx(float(losses.tile2vec_loss(A, N, D, 1.0, 0.1)[0]))


def test_get_loss_fn_rejects_unknown_names_and_settings():
  with pytest.raises(ValueError, match='config.loss.name'):
    losses.get_loss_fn('contrastive')
  with pytest.raises(ValueError, match='temperature'):
    losses.get_loss_fn('triplet', temperature=0.1)
