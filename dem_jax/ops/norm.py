"""Batch normalisation with its gradient written out: the passes over the activation that XLA:CPU needs, no more.

`flax.linen.BatchNorm`, differentiated by JAX, in bfloat16 on XLA:CPU materialises a float32 copy of every
convolution's output (its statistics, the normalisation and the backward pass each read it) and keeps float32
intermediates for the backward pass. Here the forward pass reads the activation twice (per-channel sums, then the
normalisation folded into one multiply-add per channel) and keeps only its input (and, with the ReLU folded in, its
output) and per-channel vectors; the backward pass reads input and output gradient twice (two per-channel sums,
then the input gradient). On CPU a native kernel (`onednn.channel_sums`) takes the sums, reading bfloat16 as it is.
Every pass converts to float32 as it reads, so statistics and sums are float32 whatever the activations' type.
`relu` keeps its output, not its input, for the backward pass, so the sum before it is never stored.

`BatchNorm` is the module, with flax's parameters and running averages (same names, shapes and update), so
checkpoints are shared. The results are flax's: statistics over every axis but the last (and over the devices of
`axis_name` under pmap), the biased variance as mean(x^2) - mean^2 clipped at 0, and the same gradients, including
those that reach the statistics themselves.
"""

import functools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from dem_jax.ops import onednn


def _count(x: jax.Array, axis_name) -> jax.Array:
  """How many values each channel's statistics cover (on every device of `axis_name` together)."""
  local = jnp.float32(x.size // x.shape[-1])
  return local if axis_name is None else lax.psum(local, axis_name)


def _channel_sums(a: jax.Array, b: jax.Array, where: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(sum(a), sum(a * b)) per channel over every axis but the last (only where `where` > 0, if given), in float32
  (this device's part)."""
  if a.dtype in (jnp.float32, jnp.bfloat16) and jax.default_backend() == 'cpu' and onednn.available():
    return onednn.channel_sums(a, b, where)  # Reads bfloat16 as it is; XLA:CPU would copy it into float32 first.
  af, bf = a.astype(jnp.float32), b.astype(jnp.float32)
  if where is not None:
    af = jnp.where(where > 0, af, 0.0)
  axes = tuple(range(a.ndim - 1))
  return jnp.sum(af, axis=axes), jnp.sum(af * bf, axis=axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, axis_name=None,
                     relu: bool = False):
  """(y, mean, var): `x` normalised by its batch statistics, times `scale` plus `bias` (per channel, the last axis),
  then, with `relu`, max(., 0).

  y has x's dtype; mean and var (biased) are float32, for the running averages. With `relu` the backward pass
  takes the ReLU's mask from y inside its own sums, so the masked gradient is never stored.
  """
  return _batch_norm_fwd(x, scale, bias, epsilon, axis_name, relu)[0]


def _batch_norm_fwd(x, scale, bias, epsilon, axis_name, relu):
  xf = x.astype(jnp.float32)
  total, total_sq = _channel_sums(x, x)
  if axis_name is not None:
    total, total_sq = lax.psum((total, total_sq), axis_name)
  count = _count(x, axis_name)
  mean = total / count
  var = jnp.maximum(total_sq / count - mean * mean, 0.0)
  inv = lax.rsqrt(var + epsilon)
  # One multiply-add per element with per-channel factors. No (x - mean) array is formed, here or in the backward
  # pass: XLA would otherwise share one between the two and keep it, in float32, from one pass to the other.
  gain = scale.astype(jnp.float32) * inv
  y = xf * gain + (bias.astype(jnp.float32) - mean * gain)
  y = (jnp.maximum(y, 0.0) if relu else y).astype(x.dtype)
  return (y, mean, var), (x, y if relu else None, mean, inv, scale, bias)


def _batch_norm_bwd(epsilon, axis_name, relu, residuals, cotangents):
  del epsilon  # in `inv` already
  x, y, mean, inv, scale, bias = residuals
  dy, dmean, dvar = cotangents
  dy = dy.astype(x.dtype)
  xf, dyf = x.astype(jnp.float32), dy.astype(jnp.float32)
  if relu:  # Through the ReLU first: its gradient is 0 where it gave 0 (as jax.nn.relu's, at 0 included).
    dyf = jnp.where(y > 0, dyf, 0.0)
  # The parameters' gradients are this device's sums (flax's, under pmap); the input's gradient needs the sums over
  # every device the statistics came from. sum(dy * (x - mean)) = sum(dy * x) - mean * sum(dy).
  local_dy, local_dy_x = _channel_sums(dy, x, y if relu else None)
  dbias, dscale = local_dy, (local_dy_x - mean * local_dy) * inv
  sum_dy, sum_dy_x = (local_dy, local_dy_x) if axis_name is None else lax.psum((local_dy, local_dy_x), axis_name)
  if axis_name is not None:
    dmean, dvar = lax.psum((dmean, dvar), axis_name)
  sum_dy_centred = sum_dy_x - mean * sum_dy
  count = _count(x, axis_name)
  gain = scale.astype(jnp.float32) * inv
  # dx = gain * (dy - mean(dy) - (x - mean) * inv^2 * mean(dy * (x - mean))) + (dmean + 2 dvar (x - mean)) / count,
  # gathered into dx = gain * dy + x * slope + offset with per-channel slope and offset.
  slope = (2.0 * dvar - gain * inv * inv * sum_dy_centred) / count
  offset = (dmean - gain * sum_dy) / count - mean * slope
  dx = dyf * gain + xf * slope + offset
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


@jax.custom_vjp
def relu(x: jax.Array) -> jax.Array:
  """max(x, 0), whose gradient (0 at 0, as jax.nn.relu's) is read from the output: what precedes it fuses into it."""
  return jnp.maximum(x, 0)


def _relu_fwd(x):
  y = relu(x)
  return y, y


def _relu_bwd(y, dy):
  return (jnp.where(y > 0, dy, jnp.zeros_like(dy)),)


relu.defvjp(_relu_fwd, _relu_bwd)


class BatchNorm(nn.Module):
  """`flax.linen.BatchNorm` over the last axis (same parameters, running averages and results) on
  `batch_norm_train`, then a ReLU if `relu`. The output has the input's dtype; parameters and statistics are
  float32.

  Called as `bn(features=C)` with no input (and `use_running_average`), it declares the same variables and returns
  its inference-mode normalisation as per-channel float32 (mean, gain, bias), y = (x - mean) * gain + bias, for
  folding into the convolution before it (`ops.conv.conv2d_folded_norm`).
  """
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  axis_name: str | None = None
  relu: bool = False

  @nn.compact
  def __call__(self, x=None, *, features: int | None = None):
    if (x is None) == (features is None):
      raise ValueError('BatchNorm takes either an input or, to fold it into a convolution, features=')
    if x is None and not self.use_running_average:
      raise ValueError('only an inference-mode BatchNorm (use_running_average=True) folds into a convolution')
    features = x.shape[-1] if x is not None else features
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
    running_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))
    if self.use_running_average:
      gain = scale * lax.rsqrt(running_var.value + self.epsilon)
      if x is None:
        return running_mean.value, gain, bias
      y = (x.astype(jnp.float32) - running_mean.value) * gain + bias
      return (jnp.maximum(y, 0.0) if self.relu else y).astype(x.dtype)
    # As flax: no statistics across devices while initialising.
    axis_name = None if self.is_initializing() else self.axis_name
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, axis_name, self.relu)
    if not self.is_initializing():
      running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
      running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
    return y
