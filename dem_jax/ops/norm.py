"""Batch normalisation with its gradient written out: the passes over the activation that XLA:CPU needs, no more.

`flax.linen.BatchNorm`, differentiated by JAX, in bfloat16 on XLA:CPU materialises a float32 copy of every
convolution's output (its statistics, the normalisation and the backward pass each read it) and keeps float32
intermediates for the backward pass. Here the forward pass reads the activation twice (statistics, then the
normalisation folded into one multiply-add per channel) and keeps only the input and per-channel vectors; the
backward pass reads input and output gradient twice (two per-channel sums, then the input gradient). `BatchNorm` is
the module, with flax's parameters and running averages (same names, shapes and update), so checkpoints are shared. Every pass
converts to float32 as it reads, so statistics and sums are float32 whatever the activations' type.

The results are flax's: statistics over every axis but the last (and over the devices of `axis_name` under pmap),
the biased variance as mean(x^2) - mean^2 clipped at 0, and the same gradients, including those that reach the
statistics themselves.
"""

import functools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp


def _count(x: jax.Array, axis_name) -> jax.Array:
  """How many values each channel's statistics cover (on every device of `axis_name` together)."""
  local = jnp.float32(x.size // x.shape[-1])
  return local if axis_name is None else lax.psum(local, axis_name)


def _sum(values, axis_name):
  """Per-channel sums over every axis but the last, over the devices of `axis_name` as well."""
  sums = [jnp.sum(v, axis=tuple(range(v.ndim - 1))) for v in values]
  return sums if axis_name is None else lax.psum(sums, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, axis_name=None):
  """(y, mean, var): `x` normalised by its batch statistics, times `scale` plus `bias` (per channel, the last axis).

  y has x's dtype; mean and var (biased) are float32, for the running averages.
  """
  return _batch_norm_fwd(x, scale, bias, epsilon, axis_name)[0]


def _batch_norm_fwd(x, scale, bias, epsilon, axis_name):
  xf = x.astype(jnp.float32)
  total, total_sq = _sum([xf, xf * xf], axis_name)
  count = _count(x, axis_name)
  mean = total / count
  var = jnp.maximum(total_sq / count - mean * mean, 0.0)
  inv = lax.rsqrt(var + epsilon)
  y = ((xf - mean) * (scale.astype(jnp.float32) * inv) + bias.astype(jnp.float32)).astype(x.dtype)
  return (y, mean, var), (x, mean, inv, scale, bias)


def _batch_norm_bwd(epsilon, axis_name, residuals, cotangents):
  del epsilon  # in `inv` already
  x, mean, inv, scale, bias = residuals
  dy, dmean, dvar = cotangents
  xf, dyf = x.astype(jnp.float32), dy.astype(jnp.float32)
  centred = xf - mean
  # The parameters' gradients are this device's sums (flax's, under pmap); the input's gradient needs the sums over
  # every device the statistics came from.
  local = [jnp.sum(v, axis=tuple(range(v.ndim - 1))) for v in (dyf, dyf * centred)]
  dbias, dscale = local[0], local[1] * inv
  sum_dy, sum_dy_centred = local if axis_name is None else lax.psum(local, axis_name)
  if axis_name is not None:
    dmean, dvar = lax.psum([dmean, dvar], axis_name)
  count = _count(x, axis_name)
  gain = scale.astype(jnp.float32) * inv
  # d y / d x through the normalisation, then what the mean and variance outputs' own cotangents add.
  dx = gain * (dyf - sum_dy / count - centred * (inv * inv) * (sum_dy_centred / count))
  dx = dx + (dmean + 2.0 * dvar * centred) / count
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class BatchNorm(nn.Module):
  """`flax.linen.BatchNorm` over the last axis (same parameters, running averages and results) on
  `batch_norm_train`. The output has the input's dtype; parameters and statistics are float32."""
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
    running_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))
    if self.use_running_average:
      gain = scale * lax.rsqrt(running_var.value + self.epsilon)
      return ((x.astype(jnp.float32) - running_mean.value) * gain + bias).astype(x.dtype)
    # As flax: no statistics across devices while initialising.
    axis_name = None if self.is_initializing() else self.axis_name
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, axis_name)
    if not self.is_initializing():
      running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
      running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
    return y
