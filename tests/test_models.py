"""The ResNet encoder and its CPU convolution: shapes, normalisation, and equal results for every conv_impl."""

import functools
import os
import subprocess
import sys

os.environ.setdefault('JAX_NUM_CPU_DEVICES', '4')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
from jax import lax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dem_jax.ops import conv as conv_ops  # noqa: E402
from dem_jax import embed  # noqa: E402
from dem_jax import models  # noqa: E402
from dem_jax import process  # noqa: E402
from dem_jax.ops import onednn  # noqa: E402

# [B, T, M] = 64 x 32: the stem sees 64 x 32 positions, the last stage 2 x 1, so 'auto' mixes both convolutions.
TILES = np.random.default_rng(0).standard_normal((4, 64, 32)).astype(np.float32)


def tiny(conv_impl='auto', **kw):
  # One block per stage: still every kind of layer (stem, stride 1 and 2, projection), half the compilation.
  kw = dict(stage_sizes=(1, 1, 1, 1), width=0.125, embedding_dim=8, dropout_rate=0.0, conv_impl=conv_impl) | kw
  return models.ResNet(**kw)


@pytest.fixture(scope='module')
def variables():
  # 'rbg': XLA:CPU compiles threefry slowly, once per parameter (see train_step.create_train_state).
  return jax.jit(lambda rng: tiny('xla').init(rng, TILES[:1]))(jax.random.key(0, impl='rbg'))


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, x):
  return model.apply(variables, x, train=False)


def apply_fn(model):
  # One compilation per distinct model, shared by the tests (flax modules compare by their fields).
  return functools.partial(_apply, model)


def test_embeddings_have_unit_norm_and_accept_a_channel_axis(variables):
  f = apply_fn(tiny())
  z = np.asarray(f(variables, TILES))
  assert z.shape == (4, 8) and z.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)
  with_channel = jax.eval_shape(lambda v, x: tiny().apply(v, x), variables, TILES[..., None])
  assert with_channel.shape == (4, 8)


@pytest.mark.parametrize('name,blocks', [('resnet18', (2, 2, 2, 2)), ('resnet34', (3, 4, 6, 3))])
def test_architecture_follows_name_and_width(name, blocks):
  config = ml_collections.ConfigDict(dict(name=name, width=0.125, embedding_dim=16, dropout_rate=0.5,
                                          conv_impl='auto', dtype='float32'))
  model = models.create_model(config)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 32)))['params']
  assert params['stem_conv']['kernel'].shape == (7, 7, 1, 8)  # 64 * 0.125 channels
  for stage, channels in enumerate((8, 16, 32, 64)):
    names = [k for k in params if k.startswith(f'stage{stage + 1}_')]
    assert len(names) == blocks[stage]
    assert params[f'stage{stage + 1}_block1']['conv2']['kernel'].shape == (3, 3, channels, channels)
  # A 1x1 projection wherever the shape changes: the first block of stages 2-4.
  assert [k for k in params if 'proj_conv' in params[k]] == ['stage2_block1', 'stage3_block1', 'stage4_block1']
  assert params['head']['kernel'].shape == (64, 16)


@pytest.mark.parametrize('hidden', [0, 24])
def test_head_is_one_layer_or_an_mlp_and_models_head_applies_it_alone(hidden):
  """The embedding is `models.Head` applied to the pooled trunk features, normalised (what HEAR's timestamps do)."""
  config = ml_collections.ConfigDict(dict(name='resnet18', width=0.125, embedding_dim=16, head_hidden=hidden,
                                          conv_impl='xla', dtype='float32'))
  model = models.create_model(config)
  tiles = np.random.default_rng(0).standard_normal((3, 40, 16)).astype(np.float32)
  variables = model.init(jax.random.key(0), tiles)
  params = variables['params']
  if hidden:
    assert params['head_hidden']['kernel'].shape == (64, hidden) and params['head']['kernel'].shape == (hidden, 16)
  else:
    assert 'head_hidden' not in params and params['head']['kernel'].shape == (64, 16)
  out = embed.forward_with_trunk(model, variables, tiles)
  head_params = models.head_params(params)
  assert sorted(head_params) == (['head', 'head_hidden'] if hidden else ['head'])
  z = models.Head(16, hidden).apply({'params': head_params}, out['trunk'])
  np.testing.assert_allclose(out['embedding'], z / np.linalg.norm(z, axis=-1, keepdims=True), atol=1e-5)
  if hidden:  # not one linear map: a negated trunk does not negate the projection
    assert not np.allclose(models.Head(16, hidden).apply({'params': head_params}, -out['trunk']), -z, atol=1e-3)


def test_negative_head_width_is_refused():
  with pytest.raises(ValueError, match='head_hidden=-1'):
    models.Head(16, -1).init(jax.random.key(0), jnp.zeros((1, 8)))


def test_unknown_model_name_is_rejected():
  with pytest.raises(ValueError, match='resnet18'):
    models.create_model(ml_collections.ConfigDict(dict(name='resnet50')))


def test_band_statistics_standardise_each_mel_band(variables):
  mean = np.linspace(-3, 3, 32).astype(np.float32)
  std = np.linspace(0.5, 2, 32).astype(np.float32)
  with_stats = apply_fn(tiny(band_mean=tuple(mean), band_std=tuple(std)))(variables, TILES)
  by_hand = apply_fn(tiny())(variables, (TILES - mean) / std)
  np.testing.assert_allclose(with_stats, by_hand, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='mel bands'):
    tiny(band_mean=(0.0,) * 8, band_std=(1.0,) * 8).apply(variables, TILES)


def test_dropout_acts_only_while_training(variables):
  model = tiny(dropout_rate=0.5)
  train = jax.jit(lambda v, x, rng: model.apply(v, x, train=True, rngs={'dropout': rng}, mutable=['batch_stats'])[0])
  z1, z2 = train(variables, TILES, jax.random.key(1)), train(variables, TILES, jax.random.key(2))
  assert np.abs(np.asarray(z1) - np.asarray(z2)).max() > 1e-3
  eval_fn = apply_fn(model)
  np.testing.assert_array_equal(eval_fn(variables, TILES), eval_fn(variables, TILES))


@pytest.mark.parametrize('impl', ['im2col', 'onednn'])
def test_swapping_conv_impl_on_the_same_parameters_gives_the_same_model(variables, impl):
  """A checkpoint trained with XLA's convolution (GPU) loads and runs with the CPU convolutions, and back."""
  for other in (impl, 'auto'):
    params = jax.eval_shape(tiny(other).init, jax.random.key(0), TILES[:1])
    assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, variables)

  def loss_and_grad(impl):
    model = tiny(impl)

    def loss(params):
      z, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, TILES, train=True,
                         mutable=['batch_stats'])
      return jnp.sum(z * jnp.arange(8.0))
    return jax.jit(jax.value_and_grad(loss))(variables['params'])

  value, grads = loss_and_grad(impl)
  value_ref, grads_ref = loss_and_grad('xla')
  np.testing.assert_allclose(value, value_ref, rtol=1e-5)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4 * np.abs(g_ref).max())


def test_batchnorm_axis_name_gives_global_batch_statistics(variables):
  """With axis_name, BatchNorm on two halves of the batch computes what one device computes on all of it."""
  full = tiny()
  split = full.clone(axis_name='devices')
  run = lambda m, x: m.apply(variables, x, train=True, mutable=['batch_stats'])
  z, stats = jax.jit(lambda x: run(full, x))(TILES)
  z_split, stats_split = jax.jit(jax.vmap(lambda x: run(split, x), axis_name='devices'))(TILES.reshape(2, 2, 64, 32))
  np.testing.assert_allclose(np.asarray(z_split).reshape(4, 8), z, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(stats_split), jax.tree.leaves(stats)):
    np.testing.assert_allclose(a[0], b, rtol=1e-4, atol=1e-6)


def test_bfloat16_computation_keeps_float32_parameters_and_output(variables):
  z16 = apply_fn(tiny(dtype=jnp.bfloat16))(variables, TILES)
  assert z16.dtype == jnp.float32
  np.testing.assert_allclose(z16, apply_fn(tiny())(variables, TILES), atol=0.1)


CONV_CASES = [  # (input [N, H, W, C], kernel (KH, KW, C, O), strides, padding)
    ((2, 9, 12, 1), (7, 7, 1, 4), (2, 2), ((3, 3), (3, 3))),  # the stem
    ((2, 6, 5, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1))),
    ((2, 7, 8, 3), (3, 3, 3, 5), (2, 2), ((1, 1), (1, 1))),  # stride 2 on an odd size
    ((2, 2, 4, 6), (3, 3, 6, 6), (1, 1), ((1, 1), (1, 1))),  # a tiny map, as in ResNet's last stage
    ((2, 6, 6, 4), (1, 1, 4, 8), (2, 2), ((0, 0), (0, 0))),  # the 1x1 projection
    ((1, 5, 7, 2), (2, 3, 2, 3), (1, 2), ((0, 1), (2, 0))),  # uneven everything
    ((1, 1, 4, 2), (3, 3, 2, 3), (1, 1), ((3, 3), (1, 1))),  # output rows that see only padding
]


@pytest.mark.parametrize('impl', ['im2col', 'onednn'])
@pytest.mark.parametrize('x_shape,k_shape,strides,padding', CONV_CASES)
def test_cpu_convolutions_match_xla_convolution_and_its_gradients(impl, x_shape, k_shape, strides, padding):
  rng = np.random.default_rng(1)
  x = rng.standard_normal(x_shape).astype(np.float32)
  k = rng.standard_normal(k_shape).astype(np.float32)

  @jax.jit
  def both(x, k):
    def value_and_grads(conv):
      f = lambda x, k: jnp.sum(jnp.sin(conv(x, k, strides, padding)))  # sin: a cotangent that varies per output
      return conv(x, k, strides, padding), jax.grad(f, argnums=(0, 1))(x, k)
    conv = {'im2col': conv_ops.conv2d_im2col, 'onednn': onednn.conv2d_onednn}[impl]
    return value_and_grads(conv), value_and_grads(conv_ops.conv2d_xla)

  (y, (dx, dk)), (y_ref, (dx_ref, dk_ref)) = both(x, k)
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=1e-5)


needs_onednn_bf16 = pytest.mark.skipif(not onednn.bf16_available(), reason='no oneDNN bfloat16 kernels on this CPU')
needs_onednn_folding = pytest.mark.skipif(not conv_ops.folds_norm('auto', jnp.float32),
                                          reason='no oneDNN convolutions here')
BF16_ULP = 2.0**-7  # bfloat16 keeps 8 significant bits: one rounding is off by at most half of this, relatively


@needs_onednn_bf16
@pytest.mark.parametrize('x_shape,k_shape,strides,padding', CONV_CASES)
def test_bfloat16_onednn_convolution_rounds_the_float32_result_once(x_shape, k_shape, strides, padding):
  """bfloat16 activations with a float32 kernel: the output and input gradient are the float32 convolution of the
  same bfloat16 values rounded once to bfloat16; the kernel gradient is float32, summed in float32."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)
  conv = lambda impl: jax.jit(lambda x, k: jax.vjp(lambda x, k: impl(x, k, strides, padding), x, k))
  y, vjp = conv(onednn.conv2d_onednn)(x, k)
  dy = jnp.asarray(rng.standard_normal(y.shape), jnp.bfloat16)
  dx, dk = vjp(dy)
  # What oneDNN sees: the kernel converted to bfloat16 (and nothing else rounded before the output).
  y_ref, vjp_ref = conv(conv_ops.conv2d_xla)(x.astype(jnp.float32), k.astype(jnp.bfloat16).astype(jnp.float32))
  dx_ref, dk_ref = vjp_ref(dy.astype(jnp.float32))
  assert (y.dtype, dx.dtype, dk.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
  for got, want in ((y, y_ref), (dx, dx_ref)):
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=BF16_ULP, atol=1e-5 * np.abs(want).max())
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=1e-5 * np.abs(dk_ref).max())


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('x_shape,k_shape,strides,padding', CONV_CASES)
def test_onednn_inference_convolution_adds_bias_residual_and_relu_in_one_call(dtype, x_shape, k_shape, strides,
                                                                                padding):
  """conv2d_bias_onednn: the convolution plus a per-channel bias, plus the residual, then the ReLU, summed in
  float32 and rounded once (bfloat16: within one rounding of the float32 result of the same bfloat16 inputs)."""
  if not onednn.available() or (dtype == jnp.bfloat16 and not onednn.bf16_available()):
    pytest.skip('no oneDNN (bfloat16) kernels here')
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal(x_shape), dtype)
  k = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(k_shape[3]), jnp.float32)
  y_ref = conv_ops.conv2d_xla(x.astype(jnp.float32), k.astype(dtype).astype(jnp.float32), strides, padding) + bias
  residual = jnp.asarray(rng.standard_normal(y_ref.shape), dtype)
  call = jax.jit(onednn.conv2d_bias_onednn, static_argnums=(3, 4, 6))
  for with_residual in (False, True):
    for relu in (False, True):
      want = y_ref + (residual.astype(jnp.float32) if with_residual else 0.0)
      want = jnp.maximum(want, 0.0) if relu else want
      got = call(x, k, bias, strides, padding, residual if with_residual else None, relu)
      assert got.dtype == dtype
      rtol = 1e-5 if dtype == jnp.float32 else BF16_ULP
      np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=rtol, atol=1e-5 * np.abs(want).max())
  with pytest.raises(ValueError, match='bias must have shape'):
    onednn.conv2d_bias_onednn(x, k, bias[:-1], strides, padding)
  with pytest.raises(ValueError, match='residual must be'):
    onednn.conv2d_bias_onednn(x, k, bias, strides, padding, residual[:, :-1])


def _with_running_statistics(variables, seed=3):
  """The variables with running means and variances away from their initial 0 and 1, and scales and biases away
  from 1 and 0, so that folding each BatchNorm into its convolution changes the kernels and biases."""
  rng = np.random.default_rng(seed)
  stats = jax.tree.map(lambda a: a + 0.5 * rng.uniform(size=a.shape).astype(np.float32), variables['batch_stats'])
  params = jax.tree.map(lambda a: a + 0.2 * rng.standard_normal(a.shape).astype(np.float32), variables['params'])
  return {'params': params, 'batch_stats': stats}


@needs_onednn_folding
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_inference_folds_batch_norm_into_the_convolutions(variables, dtype):
  """At inference on oneDNN each BatchNorm, residual sum and ReLU runs inside the convolution before it: the same
  embeddings as the unfolded network (float32: to rounding; bfloat16: no further from float32 than the unfolded
  network is, or within two bfloat16 roundings), the same gradient with respect to the input, and no convolution
  left without its folded form."""
  if dtype == jnp.bfloat16 and not onednn.bf16_available():
    pytest.skip('no oneDNN bfloat16 kernels here')
  v = _with_running_statistics(variables)
  folded, unfolded = tiny(dtype=dtype), tiny(dtype=dtype, fold_norm=False)
  z, z_ref = apply_fn(folded)(v, TILES), apply_fn(unfolded)(v, TILES)
  hlo = jax.jit(lambda x: folded.apply(v, x)).lower(TILES).as_text()
  assert hlo.count('DemOnednnConvBias') == 12 and 'DemOnednnConvForward' not in hlo  # stem, 4 x 2, 3 projections
  assert 'DemOnednnConvForward' in jax.jit(lambda x: unfolded.apply(v, x)).lower(TILES).as_text()
  if dtype == jnp.float32:
    np.testing.assert_allclose(z, z_ref, rtol=1e-5, atol=1e-6)
  else:
    z32 = apply_fn(tiny())(v, TILES)
    assert np.abs(z - z32).max() <= max(np.abs(z_ref - z32).max(), 2 * BF16_ULP)
  embed_sum = lambda model: jax.jit(jax.grad(lambda x: jnp.sum(model.apply(v, x) * jnp.arange(8.0))))
  g, g_ref = embed_sum(folded)(TILES), embed_sum(unfolded)(TILES)
  if dtype == jnp.float32:
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5 * np.abs(g_ref).max())
  else:  # the tolerance of test_bfloat16_model_on_onednn_is_as_close_to_float32_as_xla_bfloat16
    g32 = embed_sum(tiny())(TILES)
    assert np.linalg.norm(g - g32) / np.linalg.norm(g32) < 0.3


def test_folding_runs_only_where_every_convolution_is_on_onednn(monkeypatch):
  assert not conv_ops.folds_norm('xla', jnp.float32)
  assert not conv_ops.folds_norm('auto', jnp.float32, backend='gpu')
  assert not conv_ops.folds_norm('im2col', jnp.float32)
  monkeypatch.setattr(conv_ops, 'onednn_bf16_available', lambda: False)
  assert not conv_ops.folds_norm('onednn', jnp.bfloat16)


def test_bfloat16_without_native_kernels_runs_onednn_in_float32(monkeypatch):
  monkeypatch.setattr(conv_ops, 'onednn_bf16_available', lambda: False)
  x, k = jnp.ones((1, 4, 4, 2), jnp.bfloat16), jnp.ones((3, 3, 2, 3), jnp.float32)
  y = jax.jit(lambda x, k: conv_ops.conv2d(x, k, (1, 1), ((1, 1), (1, 1)), conv_impl='onednn'))(x, k)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(y[0, :, :, 0], [[8, 12, 12, 8], [12, 18, 18, 12], [12, 18, 18, 12], [8, 12, 12, 8]])


@needs_onednn_bf16
def test_bfloat16_model_on_onednn_is_as_close_to_float32_as_xla_bfloat16(variables):
  """Whole-model loss and parameter gradients in bfloat16 against float32 (BatchNorm in training mode, where the
  gradients cancel most and rounding shows most). Stated tolerance: loss within 1%, gradients within 30% relative
  L2 error overall and no further from float32 than XLA's own bfloat16 convolution gets."""
  def loss_and_grad(impl, dtype):
    model = tiny(impl, dtype=dtype)

    def loss(params):
      z, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, TILES, train=True,
                         mutable=['batch_stats'])
      return jnp.sum(z * jnp.arange(8.0))
    value, grads = jax.jit(jax.value_and_grad(loss))(variables['params'])
    return value, np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)]), jax.tree.leaves(grads)

  value_ref, grads_ref, _ = loss_and_grad('onednn', jnp.float32)
  value, grads, leaves = loss_and_grad('onednn', jnp.bfloat16)
  _, grads_xla, _ = loss_and_grad('xla', jnp.bfloat16)
  assert all(g.dtype == jnp.float32 for g in leaves)
  np.testing.assert_allclose(value, value_ref, rtol=1e-2)
  error = lambda g: np.linalg.norm(g - grads_ref) / np.linalg.norm(grads_ref)
  assert error(grads) < 0.3
  assert error(grads) <= error(grads_xla)


def test_auto_uses_xla_off_cpu_and_onednn_on_cpu():
  assert conv_ops.resolve_conv_impl('auto', (2, 4), (2, 4), backend='gpu') == 'xla'
  assert conv_ops.resolve_conv_impl('auto', (16, 32), (16, 32), backend='cpu') == 'onednn'
  assert conv_ops.resolve_conv_impl('auto', (2, 4), (2, 4), backend='cpu') == 'onednn'
  assert conv_ops.resolve_conv_impl('auto', (16, 32), (16, 32), backend='cpu', dtype=jnp.bfloat16) == 'onednn'
  assert conv_ops.resolve_conv_impl('im2col', (16, 32), (16, 32), backend='gpu') == 'im2col'
  assert conv_ops.resolve_conv_impl('xla', (2, 4), (2, 4), backend='cpu') == 'xla'
  with pytest.raises(ValueError, match='conv_impl'):
    conv_ops.resolve_conv_impl('cudnn', (2, 4), (2, 4))
  with pytest.raises(ValueError, match="'onednn' runs on CPU only"):
    conv_ops.resolve_conv_impl('onednn', (2, 4), (2, 4), backend='gpu')


def test_auto_without_onednn_uses_im2col_only_on_small_maps(monkeypatch):
  """The fallback where oneDNN is unavailable (and for float16, which it does not compute)."""
  monkeypatch.setattr(conv_ops, 'onednn_available', lambda: False)
  assert conv_ops.resolve_conv_impl('auto', (2, 4), (2, 4), backend='cpu') == 'im2col'
  assert conv_ops.resolve_conv_impl('auto', (4, 8), (2, 4), backend='cpu') == 'im2col'  # its backward sees 2 x 4
  assert conv_ops.resolve_conv_impl('auto', (16, 32), (16, 32), backend='cpu') == 'xla_cpu'
  monkeypatch.undo()
  assert conv_ops.resolve_conv_impl('auto', (16, 32), (16, 32), backend='cpu', dtype=jnp.float16) == 'xla_cpu'


def test_xla_cpu_convolution_has_the_gradients_of_xla():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 6, 5, 3)).astype(np.float32)
  k = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
  grads = lambda conv: jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k, (2, 1), ((1, 1), (1, 1))))),
                                        argnums=(0, 1)))(x, k)
  for g, g_ref in zip(grads(conv_ops.conv2d_xla_cpu), grads(conv_ops.conv2d_xla)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-6)


def test_max_pool_from_slices_matches_reduce_window():
  x = np.random.default_rng(2).standard_normal((2, 9, 8, 3)).astype(np.float32)  # ties have probability 0
  reduce_window = lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                              ((0, 0), (1, 1), (1, 1), (0, 0)))
  np.testing.assert_array_equal(conv_ops.max_pool_slices(x), reduce_window(x))
  loss = lambda pool: jax.grad(lambda x: jnp.sum(jnp.sin(pool(x))))(x)
  np.testing.assert_allclose(loss(conv_ops.max_pool_slices), loss(reduce_window), rtol=1e-6)


needs_onednn = pytest.mark.skipif(not onednn.available(), reason=onednn.unavailable_reason() or '')


@needs_onednn
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('shape, window, stride, pad', [
    ((3, 9, 8, 5), 3, 2, 1),  # the stem's pooling, odd sizes
    ((2, 8, 6, 4), 2, 2, 0),  # no padding, windows that do not overlap
    ((2, 10, 9, 3), 3, 1, 1),  # every input in up to nine windows
    ((2, 11, 7, 6), 3, 3, 2),  # padding on both sides that a window can be mostly made of
])
def test_native_max_pool_matches_the_slices_form_with_its_tied_gradient(dtype, shape, window, stride, pad):
  # Small integers: many windows hold several tied maxima, whose gradient must be shared the same way.
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.integers(-3, 4, shape).astype(np.float32), dtype)
  y, pull = jax.vjp(lambda x: conv_ops.max_pool_slices(x, window, stride, pad), x)
  y_native, pull_native = jax.vjp(lambda x: onednn.max_pool_native(x, window, stride, pad), x)
  dy = jnp.asarray(rng.standard_normal(y.shape).astype(np.float32), dtype)
  assert y_native.dtype == dtype and pull_native(dy)[0].dtype == dtype
  np.testing.assert_array_equal(np.asarray(y_native, np.float32), np.asarray(y, np.float32))
  np.testing.assert_allclose(np.asarray(pull_native(dy)[0], np.float32), np.asarray(pull(dy)[0], np.float32),
                             rtol=1e-6, atol=1e-6)


@needs_onednn
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_native_max_pool_keeps_a_nan(dtype):
  """A NaN in a window makes its maximum NaN, as jnp.maximum and reduce_window do: bad input never vanishes."""
  x = np.zeros((1, 4, 4, 2), np.float32)
  x[0, 1, 1, 0] = np.nan
  y = np.asarray(onednn.max_pool_native(jnp.asarray(x, dtype)), np.float32)
  assert np.isnan(y[..., 0]).sum() == 4 and not np.isnan(y[..., 1]).any()  # (1, 1) lies in all four windows


def test_native_max_pool_is_what_auto_runs_on_cpu_and_refuses_bad_settings():
  hlo = jax.jit(lambda x: conv_ops.max_pool(x)).lower(jnp.zeros((1, 8, 8, 2))).as_text()
  assert ('DemMaxPoolForward' in hlo) == onednn.available()
  with pytest.raises(ValueError, match='0 <= pad < window'):
    onednn.max_pool_native(jnp.zeros((1, 8, 8, 2)), window=2, stride=2, pad=2)
  with pytest.raises(ValueError, match='float32 or bfloat16'):
    onednn.max_pool_native(jnp.zeros((1, 8, 8, 2), jnp.float16))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_max_pool_shares_the_gradient_between_tied_maxima(dtype):
  """All zeros (as after a ReLU): each output's gradient is split equally among the input elements of its window."""
  dx = jax.grad(lambda x: jnp.sum(conv_ops.max_pool_slices(x).astype(jnp.float32)))(jnp.zeros((1, 4, 4, 1), dtype))
  assert dx.dtype == dtype
  np.testing.assert_allclose(np.sum(np.asarray(dx, np.float32)), 4.0, rtol=1e-2)  # 2 x 2 outputs, nothing lost
  # Input (1, 1) lies in all four windows, of 4, 6, 6 and 9 elements (the rest is padding).
  np.testing.assert_allclose(float(dx[0, 1, 1, 0]), 1 / 4 + 2 / 6 + 1 / 9, rtol=1e-2)


def test_retain_freed_memory_keeps_what_the_environment_set(monkeypatch):
  """launch.sh sets the malloc variables before the process starts; the in-process call must not undo them."""
  calls = []

  class Libc:
    def mallopt(self, param, value):
      calls.append((param, value))
      return 1

  monkeypatch.setattr(process.ctypes, 'CDLL', lambda name: Libc())
  for name in ('MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_'):
    monkeypatch.delenv(name, raising=False)
  assert process.retain_freed_memory()
  m_arena_max, m_mmap_max, m_trim_threshold = -8, -4, -1
  assert sorted(calls) == sorted([(m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1)])
  calls.clear()
  monkeypatch.setenv('MALLOC_TRIM_THRESHOLD_', str(8 << 30))
  assert process.retain_freed_memory()
  assert sorted(calls) == sorted([(m_arena_max, 1), (m_mmap_max, 0)])


def test_auto_dtype_is_bfloat16_off_cpu_and_on_cpus_where_it_wins():
  assert models.resolve_dtype('auto', backend='gpu') == jnp.bfloat16
  # On CPU: bfloat16 only where oneDNN runs it natively, on networks of at least half width.
  native = jnp.bfloat16 if onednn.bf16_available() else jnp.float32
  assert models.resolve_dtype('auto', backend='cpu', width=1.0) == native
  assert models.resolve_dtype('auto', backend='cpu', width=0.5) == native
  assert models.resolve_dtype('auto', backend='cpu', width=0.25) == jnp.float32
  assert models.resolve_dtype('auto', backend='cpu', width=1.0, conv_impl='xla') == jnp.float32
  assert models.resolve_dtype('float32', backend='gpu') == jnp.float32
  assert models.resolve_dtype('bfloat16', backend='cpu') == jnp.bfloat16  # as asked
  auto = lambda width: models.create_model(ml_collections.ConfigDict(dict(name='resnet18', dtype='auto',
                                                                         width=width))).dtype
  assert (auto(1.0), auto(0.125)) == (native, jnp.float32)
  with pytest.raises(ValueError, match=r"config.model.dtype='float16'; choose one of \('auto'"):
    models.create_model(ml_collections.ConfigDict(dict(name='resnet18', dtype='float16')))


def _batch_norm_loss(module, variables, weights, relu=False):
  """A loss of BatchNorm's output (after jax.nn.relu, for flax's, with `relu`) and of the running averages it writes
  (so the statistics' gradients count too)."""
  def loss(params, x):
    y, updates = module.apply({'params': params, 'batch_stats': variables['batch_stats']}, x, mutable=['batch_stats'])
    y = jax.nn.relu(y) if relu else y
    stats = updates['batch_stats']
    return jnp.sum(jnp.sin(y.astype(jnp.float32)) * weights) + jnp.sum(3 * stats['mean'] + stats['var'] ** 2), y
  return loss


@pytest.mark.parametrize('relu', [False, True])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_batch_norm_has_flax_values_running_averages_and_gradients(dtype, relu):
  """Ours, with relu=True, against flax's followed by jax.nn.relu."""
  from dem_jax.ops import norm
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((8, 5, 6, 3)) * 2 + 1.5, dtype)
  weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  ours = norm.BatchNorm(momentum=0.9, epsilon=1e-5, relu=relu)
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dtype)
  variables = flax_bn.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, variables)
  params = {'scale': jnp.linspace(0.5, 1.5, 3), 'bias': jnp.linspace(-1.0, 1.0, 3)}
  y, grads = [], []
  for module, then_relu in ((flax_bn, relu), (ours, False)):
    (_, out), g = jax.value_and_grad(_batch_norm_loss(module, variables, weights, then_relu), argnums=(0, 1),
                                     has_aux=True)(params, x)
    assert out.dtype == dtype and g[1].dtype == dtype  # output and input gradient in the activations' type
    y.append(np.asarray(out, np.float32))
    grads.append(g)
  np.testing.assert_allclose(y[1], y[0], atol=1e-6 if dtype == jnp.float32 else 1e-2)
  for ours_g, flax_g in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0])):
    # bfloat16: the input gradient may differ by its last bit.
    np.testing.assert_allclose(np.asarray(ours_g, np.float32), np.asarray(flax_g, np.float32), rtol=1e-5,
                               atol=1e-5 if ours_g.dtype == jnp.float32 else 2e-2)
  inference = {'params': params, 'batch_stats': {'mean': jnp.array([0.3, -0.2, 1.0]),
                                                 'var': jnp.array([2.0, 0.5, 1.5])}}
  flax_inference = nn.BatchNorm(use_running_average=True, dtype=dtype).apply(inference, x)
  np.testing.assert_allclose(
      np.asarray(norm.BatchNorm(use_running_average=True, relu=relu).apply(inference, x), np.float32),
      np.asarray(jax.nn.relu(flax_inference) if relu else flax_inference, np.float32), atol=1e-2)


def test_batch_norm_across_devices_has_flax_gradients_under_pmap():
  from dem_jax.ops import norm
  x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 2, 5, 6, 3)) + 0.5, jnp.float32)
  params = {'scale': jnp.linspace(0.5, 1.5, 3), 'bias': jnp.linspace(-1.0, 1.0, 3)}
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, axis_name='batch')
  variables = flax_bn.init(jax.random.key(0), x[0])
  grads = [jax.pmap(lambda x, m=m: jax.grad(_batch_norm_loss(m, variables, 1.3), argnums=(0, 1), has_aux=True)(
      params, x), axis_name='batch')(x) for m in (flax_bn, norm.BatchNorm(momentum=0.9, axis_name='batch'))]
  for ours_g, flax_g in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0])):
    np.testing.assert_allclose(ours_g, flax_g, rtol=1e-5, atol=2e-5)


@needs_onednn
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_native_channel_sums_match_numpy(dtype):
  rng = np.random.default_rng(6)
  a = jnp.asarray(rng.standard_normal((7, 5, 3, 4)) + 2.0, dtype)
  b = jnp.asarray(rng.standard_normal((7, 5, 3, 4)), dtype)
  total, dot = jax.jit(onednn.channel_sums)(a, b)
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)  # the values as stored, summed exactly
  np.testing.assert_allclose(total, a64.sum(axis=(0, 1, 2)), rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(dot, (a64 * b64).sum(axis=(0, 1, 2)), rtol=1e-6, atol=1e-5)
  with pytest.raises(ValueError, match='one shape'):
    onednn.channel_sums(a, b[..., :2])


@needs_onednn
def test_native_channel_sums_are_the_same_with_one_thread(tmp_path):
  """Fixed chunks added in a fixed order: the float32 sums do not depend on how many threads OpenMP runs."""
  x = np.random.default_rng(7).standard_normal((300, 8, 16)).astype(np.float32) * 100
  np.save(tmp_path / 'x.npy', x)
  script = ('import sys, numpy as np, jax.numpy as jnp\n'
            'from dem_jax.ops import onednn\n'
            'x = jnp.asarray(np.load(sys.argv[1]))\n'
            'np.save(sys.argv[2], np.stack(onednn.channel_sums(x, x)))\n')
  sums = {}
  for threads in ('1', '2'):
    out = tmp_path / f'sums{threads}.npy'
    subprocess.run([sys.executable, '-c', script, str(tmp_path / 'x.npy'), str(out)], check=True, timeout=120,
                   env=dict(os.environ, OMP_NUM_THREADS=threads, JAX_PLATFORMS='cpu'))
    sums[threads] = np.load(out)
  np.testing.assert_array_equal(sums['1'], sums['2'])


def test_relu_reading_its_output_has_the_gradient_of_jax_relu():
  from dem_jax.ops import norm
  x = jnp.array([-2.0, -0.0, 0.0, 1e-30, 3.0])  # zero included: both give it gradient 0
  dy = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])
  ours, pull = jax.vjp(norm.relu, x)
  reference, pull_reference = jax.vjp(jax.nn.relu, x)
  np.testing.assert_array_equal(ours, reference)
  np.testing.assert_array_equal(pull(dy)[0], pull_reference(dy)[0])


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_relu_after_the_max_pool_is_the_same_as_before_it(dtype):
  """The stem pools and then applies ReLU (a quarter of the positions): the same values and gradients, ties and
  all-negative windows included."""
  from dem_jax.ops import norm
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.integers(-3, 4, (3, 9, 8, 5)).astype(np.float32), dtype)
  y_before, pull_before = jax.vjp(lambda x: conv_ops.max_pool(norm.relu(x)), x)
  y_after, pull_after = jax.vjp(lambda x: norm.relu(conv_ops.max_pool(x)), x)
  dy = jnp.asarray(rng.standard_normal(y_before.shape).astype(np.float32), dtype)
  np.testing.assert_array_equal(y_after, y_before)
  np.testing.assert_array_equal(pull_after(dy)[0], pull_before(dy)[0])
