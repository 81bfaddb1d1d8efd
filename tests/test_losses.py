"""Losses against values worked out by hand, and their agreement across devices."""

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
  with pytest.raises(ValueError, match='alpha'):
    losses.get_loss_fn('triplet', alpha=0.1)
  with pytest.raises(ValueError, match='config.loss.temperature'):
    losses.get_loss_fn('infonce', temperature=0.0)
  for share in (1.0, -0.1):
    with pytest.raises(ValueError, match='config.loss.debias'):
      losses.get_loss_fn('infonce', debias=share)


# Batch-wide losses on the same two triplets. Candidates in order [n0, n1, d0, d1] = [(0,1), (-1,0), (-1,0), (0,1)];
# both anchors are (1,0), so their squared distances to the candidates are [2, 4, 4, 2]. Anchor 0's positive is
# n0 (2), anchor 1's is n1 (4).


def test_batch_hard_uses_the_closest_negative_of_the_whole_batch():
  # Anchor 0: negatives n1, d0, d1 at 4, 4, 2 -> hardest 2 -> max(0, 2 - 2 + 1) = 1 (its own d0 alone would give 0).
  # Anchor 1: negatives n0, d0, d1 at 2, 4, 2 -> hardest 2 -> 4 - 2 + 1 = 3. Mean over anchors: 2.
  loss, m = losses.batch_hard_triplet_loss(A, N, D, margin=1.0)
  assert float(loss) == pytest.approx(2.0)
  assert float(m['active_fraction']) == 1.0
  assert float(m['d_pos']) == pytest.approx(3.0) and float(m['d_neg']) == pytest.approx(3.0)


def test_batch_all_averages_over_active_anchor_negative_pairs():
  # margin 0.5. Anchor 0 (d_pos 2): negatives at 4, 4, 2 -> hinges 0, 0, 0.5.
  # Anchor 1 (d_pos 4): negatives at 2, 4, 2 -> hinges 2.5, 0.5, 2.5. Sum 6 over 4 active pairs of 6.
  loss, m = losses.batch_all_triplet_loss(A, N, D, margin=0.5)
  assert float(loss) == pytest.approx(1.5)
  assert float(m['active_fraction']) == pytest.approx(4 / 6)


def test_batch_all_gradient_by_hand():
  # d/da_i of (|a_i-n_i|^2 - |a_i-c|^2) = 2(c - n_i), summed over active pairs, divided by 4 active pairs.
  # Anchor 0: one active pair, c = d1 = (0,1), n0 = (0,1) -> 0. Anchor 1: c = n0, d0, d1 with n1 = (-1,0):
  # 2[(1,1) + (0,0) + (1,1)] = (4, 4) -> / 4 = (1, 1).
  g = jax.grad(lambda a: losses.batch_all_triplet_loss(a, N, D, margin=0.5)[0])(A)
  np.testing.assert_allclose(g, [[0., 0.], [1., 1.]], atol=1e-6)


def test_infonce_is_cross_entropy_over_all_neighbours_and_distant_tiles():
  # Cosine similarities of both anchors to [n0, n1, d0, d1]: [0, -1, -1, 0].
  # Anchor 0 (target n0, logit 0): log(e^0 + e^-1 + e^-1 + e^0) - 0. Anchor 1 (target n1, logit -1): the same + 1.
  for t in (1.0, 0.5):
    loss, m = losses.infonce_loss(A, N, D, temperature=t)
    log_z = np.log(2 + 2 * np.exp(-1 / t))
    assert float(loss) == pytest.approx(np.mean([log_z, log_z + 1 / t]), rel=1e-6)
  # Anchor 0 ties with d1, anchor 1 is beaten by n0 and d1: both misranked.
  assert float(m['active_fraction']) == 1.0
  # Scaled embeddings give the same loss: similarities are cosines.
  assert float(losses.infonce_loss(3 * A, 2 * N, D, temperature=0.5)[0]) == pytest.approx(float(loss), rel=1e-6)


def test_debiased_infonce_takes_the_positives_share_out_of_the_negatives_by_hand():
  # Same batch as above: anchor 0's positive logit is 0 and its negatives' logits [-1, -1, 0]; anchor 1's
  # positive logit is -1, its negatives' [0, -1, 0]. N = 3 negatives each; floor exp(-1 / t).
  t, share = 1.0, 0.25
  def by_hand(pos, negs):
    g = max((np.mean(np.exp(negs)) - share * np.exp(pos)) / (1 - share), np.exp(-1 / t))
    return np.log(np.exp(pos) + 3 * g) - pos
  loss, _ = losses.infonce_loss(A, N, D, temperature=t, debias=share)
  want = np.mean([by_hand(0.0, np.array([-1., -1., 0.])), by_hand(-1.0, np.array([0., -1., 0.]))])
  assert float(loss) == pytest.approx(want, rel=1e-5)
  # debias=0 is plain InfoNCE; a positive share lowers the loss here (the negatives weigh less).
  plain = float(losses.infonce_loss(A, N, D, temperature=t)[0])
  assert float(losses.infonce_loss(A, N, D, temperature=t, debias=0.0)[0]) == pytest.approx(plain, rel=1e-6)
  assert float(loss) < plain
  # When the correction would make the negatives' sum smaller than it can be, the floor holds it there.
  za = zn = jnp.array([[1., 0.], [0., 1.]])
  zd = jnp.array([[-1., 0.], [0., -1.]])
  floored = float(losses.infonce_loss(za, zn, zd, temperature=1.0, debias=0.9)[0])
  assert floored == pytest.approx(np.log(np.exp(1.0) + 3 * np.exp(-1.0)) - 1.0, rel=1e-5)


def test_infonce_counts_an_anchor_ranked_right_as_solved():
  za = jnp.array([[1., 0.], [0., 1.]])
  zn = jnp.array([[1., 0.], [0., 1.]])  # each anchor's own neighbour is the closest candidate
  zd = jnp.array([[-1., 0.], [0., -1.]])
  loss, m = losses.infonce_loss(za, zn, zd, temperature=1.0)
  assert float(m['active_fraction']) == 0.0
  # logits 1 for the target, 0 for the other neighbour, -1 and 0 for the distant tiles.
  assert float(loss) == pytest.approx(np.log(1 + 2 * np.exp(-1) + np.exp(-2)), rel=1e-6)


@pytest.mark.parametrize('name', ['batch_all', 'batch_hard', 'infonce'])
def test_batch_losses_have_finite_gradients_when_embeddings_coincide(name):
  loss_fn = losses.get_loss_fn(name)
  g = jax.grad(lambda a: loss_fn(a, a, a)[0])(A)
  assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize('name', ['triplet', 'batch_all', 'batch_hard', 'infonce'])
def test_loss_under_pmap_equals_the_single_device_loss_and_gradient(name):
  # 8 triplets on 4 devices: the batch-wide losses gather every device's neighbours and distant tiles, so each
  # anchor meets the same 15 negatives as on one device, and the averaged gradient is the single-device one.
  loss_fn = losses.get_loss_fn(name, margin=1.0, temperature=0.2, debias=0.1 if name == 'infonce' else 0.0)
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  za, zn, zd = (jnp.asarray(unit(rng.normal(size=(8, 3))), jnp.float32) for _ in range(3))
  full_loss = loss_fn(za, zn, zd)[0]
  full_grads = jax.grad(lambda *z: loss_fn(*z)[0], argnums=(0, 1, 2))(za, zn, zd)

  def per_device(a, n, d):
    loss, grads = jax.value_and_grad(lambda *z: loss_fn(*z, axis_name='i')[0], argnums=(0, 1, 2))(a, n, d)
    return jax.lax.pmean(loss, 'i'), grads

  split = lambda x: x.reshape(4, 2, 3)
  loss, grads = jax.pmap(per_device, axis_name='i')(split(za), split(zn), split(zd))
  np.testing.assert_allclose(loss, float(full_loss), rtol=1e-5)
  # pmap's gradient on device k is that of the sum over devices of their losses with respect to device k's
  # embeddings; the step's pmean divides by 4, which is the gradient of the mean loss.
  for g_split, g_full in zip(grads, full_grads):
    np.testing.assert_allclose(np.asarray(g_split).reshape(8, 3) / 4, g_full, rtol=1e-4, atol=1e-6)
