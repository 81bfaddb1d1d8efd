"""ResNet encoders that map a log-Mel tile to an L2-normalised embedding.

The network is the original system's ResNet18 (7x7/2 stem, 3x3/2 max-pool, basic blocks [2, 2, 2, 2] with
64-128-256-512 channels, global average pooling, dropout, dense projection, L2 normalisation), read as a one-channel
image: time is the height, mel bands the width. Parameter names and shapes do not depend on `conv_impl`, so a
checkpoint trained with XLA's convolution on GPU loads unchanged into the CPU path (`ops.conv`), and back.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dem_jax.ops import conv as conv_ops
from dem_jax.ops import norm as norm_ops
from dem_jax.ops import onednn

STAGE_SIZES = {'resnet18': (2, 2, 2, 2), 'resnet34': (3, 4, 6, 3)}
BASE_CHANNELS = (64, 128, 256, 512)

# He initialisation (fan-out, as torchvision's ResNet) suits ReLU networks trained from scratch.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class Conv(nn.Module):
  """Bias-free 2-D convolution on NHWC input whose algorithm is chosen per layer (see `ops.conv`).

  Its one parameter, 'kernel' [KH, KW, C, features], is shaped as in `flax.linen.Conv`.
  """
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, norm=None, residual=None, relu: bool = False):
    """The convolution of x; with `norm`, the (mean, gain, bias) of an inference-mode BatchNorm
    (`norm_ops.BatchNorm(...)(features=...)`), folded into it together with `residual` and `relu`
    (`conv_ops.conv2d_folded_norm`; only where `conv_ops.folds_norm`)."""
    kh, kw = self.kernel_size
    kernel = self.param('kernel', conv_kernel_init, (kh, kw, x.shape[-1], self.features), jnp.float32)
    # Symmetric padding k // 2, as torchvision's ResNet (and the PyTorch reference benchmark): with stride 2 on an
    # even size, 'SAME' would pad (0, 1) instead and sample a shifted grid.
    padding = ((kh // 2, kh // 2), (kw // 2, kw // 2))
    x = x.astype(self.dtype)
    if norm is not None:
      return conv_ops.conv2d_folded_norm(x, kernel, *norm, residual, self.strides, padding, relu)
    # The float32 kernel goes in as it is: ops.conv casts it to the computation dtype, or oneDNN does so itself
    # and returns its gradient summed in float32.
    return conv_ops.conv2d(x, kernel, self.strides, padding, conv_impl=self.conv_impl)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection (1x1 projection when the shape changes).

  With `fold_norm` (inference on oneDNN) each BatchNorm, and the residual sum and ReLUs after it, run inside the
  convolution before it; the variables are the same.
  """
  features: int
  strides: tuple[int, int]
  conv: Any
  norm: Any
  fold_norm: bool = False

  @nn.compact
  def __call__(self, x):
    if self.fold_norm:
      folded = lambda name: self.norm(name=name)(features=self.features)
      y = self.conv(self.features, (3, 3), self.strides, name='conv1')(x, folded('bn1'), relu=True)
      shortcut = x.astype(y.dtype)
      if x.shape != y.shape:  # as below: conv2 keeps conv1's output shape
        shortcut = self.conv(self.features, (1, 1), self.strides, name='proj_conv')(x, folded('proj_bn'))
      return self.conv(self.features, (3, 3), name='conv2')(y, folded('bn2'), residual=shortcut, relu=True)
    y = self.conv(self.features, (3, 3), self.strides, name='conv1')(x)
    y = self.norm(name='bn1', relu=True)(y)
    y = self.conv(self.features, (3, 3), name='conv2')(y)
    y = self.norm(name='bn2')(y)
    if x.shape != y.shape:
      x = self.conv(self.features, (1, 1), self.strides, name='proj_conv')(x)
      x = self.norm(name='proj_bn')(x)
    return norm_ops.relu(x + y)


class ResNet(nn.Module):
  """ResNet encoder: [B, T, M] (or [B, T, M, 1]) raw log-Mel -> [B, embedding_dim] unit-norm float32.

  Attributes:
    stage_sizes: basic blocks per stage, e.g. (2, 2, 2, 2) for ResNet18.
    width: channel multiplier on 64-128-256-512 (0.125 gives a tiny test network).
    embedding_dim: output size.
    dropout_rate: dropout before the projection, while training.
    head_hidden: 0: the projection is one dense layer (the original's); N: a hidden layer of N units and a ReLU
      before it (an MLP head, as in SimCLR), so the trunk need not serve the loss alone. See `project`.
    band_mean, band_std: per-mel-band statistics (M floats each) to standardise the input with, or None.
    conv_impl: 'auto' | 'xla' | 'im2col' | 'onednn' (see `ops.conv.resolve_conv_impl`).
    dtype: computation dtype (bfloat16 on GPU); parameters and the output stay float32.
    axis_name: BatchNorm averages its batch statistics over this mapped axis (pmap); None otherwise.
    fold_norm: at inference, where `ops.conv.folds_norm` (the convolutions on oneDNN), run each BatchNorm, residual
      sum and ReLU inside the convolution before it: one pass over each activation instead of two or three.
  """
  stage_sizes: Sequence[int]
  width: float = 1.0
  embedding_dim: int = 128
  dropout_rate: float = 0.5
  head_hidden: int = 0
  band_mean: Sequence[float] | None = None
  band_std: Sequence[float] | None = None
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32
  axis_name: str | None = None
  fold_norm: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.ndim == 4 and x.shape[-1] == 1:
      x = x[..., 0]
    if x.ndim != 3:
      raise ValueError(f'expected log-Mel tiles [B, T, M] or [B, T, M, 1], got shape {x.shape}')
    x = x.astype(jnp.float32)
    if (self.band_mean is None) != (self.band_std is None):
      raise ValueError('band_mean and band_std must be given together')
    if self.band_mean is not None:
      if len(self.band_mean) != x.shape[-1] or len(self.band_std) != x.shape[-1]:
        raise ValueError(f'band statistics have {len(self.band_mean)}/{len(self.band_std)} bands, '
                         f'input has {x.shape[-1]} mel bands')
      x = (x - jnp.asarray(self.band_mean, jnp.float32)) / jnp.asarray(self.band_std, jnp.float32)
    x = x[..., None].astype(self.dtype)

    channels = [max(1, round(c * self.width)) for c in BASE_CHANNELS]
    conv = functools.partial(Conv, conv_impl=self.conv_impl, dtype=self.dtype)
    # flax's BatchNorm, with the gradient written out (`ops.norm`): in bfloat16 on CPU, flax's left float32 copies of
    # every conv output under autodiff (docs/benchmarks.md).
    norm = functools.partial(norm_ops.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             axis_name=self.axis_name)

    fold = self.fold_norm and not train and conv_ops.folds_norm(self.conv_impl, self.dtype)
    if fold:  # the ReLU inside the convolution, before the max-pool: the same values
      x = conv(channels[0], (7, 7), (2, 2), name='stem_conv')(x, norm(name='stem_bn')(features=channels[0]),
                                                               relu=True)
      x = conv_ops.max_pool(x, self.conv_impl, window=3, stride=2, pad=1)
    else:
      x = conv(channels[0], (7, 7), (2, 2), name='stem_conv')(x)
      # ReLU after the max-pool: the same values and gradients as before it (the maximum and ReLU commute, and where
      # a window's maximum is not positive no gradient passes either way), on a quarter of the positions.
      x = conv_ops.max_pool(norm(name='stem_bn')(x), self.conv_impl, window=3, stride=2, pad=1)
      x = norm_ops.relu(x)
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = BasicBlock(channels[i], strides, conv=conv, norm=norm, fold_norm=fold,
                       name=f'stage{i + 1}_block{j + 1}')(x)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    z = project(x, self.embedding_dim, self.head_hidden, self.dtype)
    return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), 1e-12))


HEAD_LAYERS = ('head_hidden', 'head')  # The head's layers, by their parameter names (see `project`).


def head_params(params: dict) -> dict:
  """The head's entries of a network's params, which `Head` applies."""
  return {name: value for name, value in params.items() if name in HEAD_LAYERS}


def project(x, embedding_dim: int, hidden: int, dtype) -> jax.Array:
  """The head: pooled trunk features [B, C] -> [B, embedding_dim] float32, before the L2 normalisation.

  Called inside a compact module, whose scope holds the layers: 'head' (the last), and 'head_hidden' with `hidden`
  > 0. A network without a hidden layer keeps the parameter names of the original's single projection.
  """
  if hidden < 0:
    raise ValueError(f'config.model.head_hidden={hidden}; give 0 (one dense layer) or the hidden width.')
  if hidden:
    x = nn.relu(nn.Dense(hidden, dtype=dtype, name='head_hidden')(x))
  return nn.Dense(embedding_dim, dtype=dtype, name='head')(x).astype(jnp.float32)


class Head(nn.Module):
  """`project` alone, for callers that apply the head to features of their own (the HEAR timestamps): its
  parameters are the network's 'head' (and 'head_hidden') entries."""
  embedding_dim: int
  hidden: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return project(x, self.embedding_dim, self.hidden, self.dtype)


ResNet18 = functools.partial(ResNet, stage_sizes=STAGE_SIZES['resnet18'])
ResNet34 = functools.partial(ResNet, stage_sizes=STAGE_SIZES['resnet34'])


DTYPES = ('auto', 'float32', 'bfloat16')


# Narrower networks than this gain little from bfloat16 on a CPU (docs/benchmarks.md, "The CPU path").
BF16_CPU_MIN_WIDTH = 0.5


def resolve_dtype(dtype: str, backend: str | None = None, *, width: float = 1.0,
                  conv_impl: str = 'auto') -> jnp.dtype:
  """The computation dtype `config.model.dtype` names: 'float32', 'bfloat16', or 'auto'.

  'auto' is bfloat16 on GPU/TPU. On CPU it is bfloat16 where oneDNN runs bfloat16 natively (AVX512-BF16 or AMX),
  the convolutions go to oneDNN (conv_impl 'auto' or 'onednn') and the network is at least half width, where
  bfloat16 trains markedly faster than float32 (narrower networks gain little; docs/benchmarks.md). Elsewhere
  float32.
  """
  if dtype not in DTYPES:
    raise ValueError(f'config.model.dtype={dtype!r}; choose one of {DTYPES}.')
  if dtype != 'auto':
    return jnp.dtype(dtype)
  if (backend or jax.default_backend()) != 'cpu':
    return jnp.dtype(jnp.bfloat16)
  native_bf16 = conv_impl in ('auto', 'onednn') and onednn.bf16_available()
  return jnp.dtype(jnp.bfloat16 if width >= BF16_CPU_MIN_WIDTH and native_bf16 else jnp.float32)


def create_model(model_config: ml_collections.ConfigDict, band_mean: Sequence[float] | None = None,
                 band_std: Sequence[float] | None = None, axis_name: str | None = None) -> nn.Module:
  """Builds the encoder named by `model_config.name` ('resnet18' | 'resnet34').

  Reads name, width, embedding_dim, dropout_rate, head_hidden, conv_impl and dtype ('auto' | 'float32' |
  'bfloat16'; see `resolve_dtype`).
  """
  if model_config.name not in STAGE_SIZES:
    raise ValueError(f'config.model.name={model_config.name!r}; choose one of {sorted(STAGE_SIZES)}.')
  return ResNet(
      stage_sizes=STAGE_SIZES[model_config.name],
      width=float(model_config.get('width', 1.0)),
      embedding_dim=int(model_config.get('embedding_dim', 128)),
      dropout_rate=float(model_config.get('dropout_rate', 0.5)),
      head_hidden=int(model_config.get('head_hidden', 0)),
      band_mean=None if band_mean is None else tuple(float(v) for v in band_mean),
      band_std=None if band_std is None else tuple(float(v) for v in band_std),
      conv_impl=model_config.get('conv_impl', 'auto'),
      dtype=resolve_dtype(model_config.get('dtype', 'float32'), width=float(model_config.get('width', 1.0)),
                          conv_impl=model_config.get('conv_impl', 'auto')),
      axis_name=axis_name)
