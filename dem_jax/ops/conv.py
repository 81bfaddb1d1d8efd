"""Convolution and max-pooling forms that run fast on XLA:CPU, chosen per layer by `conv_impl`.

On CPU, 'auto' runs every convolution on oneDNN, and max-pooling on native loops, through XLA FFI custom calls
(`dem_jax.ops.onednn`): the triplet step then matches or beats PyTorch eager on the same machine. bfloat16
activations run on oneDNN's bfloat16 kernels where the CPU has them (AVX512-BF16 or AMX), and elsewhere on its
float32 kernels (converted around each convolution; one log line says so). Where the library cannot be built or
loaded (no C++ compiler, not Linux x86_64, DEM_JAX_ONEDNN=0), 'auto' logs why once and falls back to the pure-XLA
forms below. At inference on oneDNN, `conv2d_folded_norm` runs a convolution with the BatchNorm, residual sum and
ReLU after it in one call (`folds_norm` says where).

Why those exist: the straightforward Flax ResNet ran its triplet step on CPU many times slower than PyTorch eager,
and three XLA:CPU behaviours account for it (docs/benchmarks.md, "The pure-XLA path", has the figures):
  1. Its native convolution slows to a crawl when the map it slides over has at most
     SMALL_MAP_POSITIONS positions: ResNet's last stage on short tiles (2x4), and in the backward pass the input
     gradient of the stride-2 layer that produces such a map. There `conv2d_im2col` (windows side by side, one
     matrix multiply) runs far faster. On larger maps the native conv wins: im2col's window copy costs more than it
     saves.
  2. The kernel gradient of a native conv wants its inputs transposed to channel-major order. XLA fuses the
     transpose into the producer (BatchNorm's backward pass, the activation), and such transposing fusions run
     slower than a plain transpose; materialising the inputs first (`lax.optimization_barrier`) makes them plain
     copies and the whole step faster.
  3. reduce_window's gradient (select_and_scatter) goes through iota/argmax tuples and a scatter, slower than the
     gradient of a maximum over strided slices (`max_pool_slices`).
Off CPU, `conv_impl='auto'` leaves XLA's own convolution and pooling in place (cuDNN on GPU), so the GPU path is
the plain one. The pure-XLA forms are built from jnp/lax ops (pad, slice, concatenate, dot_general,
conv_general_dilated) and are differentiable; parameters do not depend on the choice.
"""

import functools
import math
from typing import Sequence

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp

from dem_jax.ops import onednn

CONV_IMPLS = ('auto', 'xla', 'im2col', 'onednn')
SMALL_MAP_POSITIONS = 8

Padding = Sequence[tuple[int, int]]


def conv2d_im2col(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
                  padding: Padding = ((0, 0), (0, 0))) -> jax.Array:
  """Same result as `lax.conv_general_dilated` with NHWC input, HWIO kernel and explicit padding, as matmuls.

  Output rows are grouped by the kernel rows that fall inside the (unpadded) input: top edge, interior, bottom edge.
  Each group gathers only its valid windows side by side and multiplies them with those kernel rows, so zero
  padding rows are never multiplied; on a 2-row map (ResNet's last stage on short tiles) that is a third of the work.

  Args:
    x: [N, H, W, C] input.
    kernel: [KH, KW, C, O] kernel.
    strides: (SH, SW).
    padding: ((top, bottom), (left, right)) zero padding.

  Returns:
    [N, OH, OW, O] output, OH = (H + top + bottom - KH) // SH + 1 (likewise OW).
  """
  kh, kw, c, o = kernel.shape
  n, h, _, c_in = x.shape
  if c_in != c:
    raise ValueError(f'input has {c_in} channels, kernel expects {c}')
  sh, sw = strides
  (pt, pb), (pl, pr) = padding
  oh = (h + pt + pb - kh) // sh + 1
  if pl or pr:
    x = jnp.pad(x, ((0, 0), (0, 0), (pl, pr), (0, 0)))
  ow = (x.shape[2] - kw) // sw + 1
  groups = []  # [first output row, end row, first valid kernel row, end kernel row]
  for r in range(oh):
    valid = [i for i in range(kh) if 0 <= r * sh + i - pt < h]
    rows = (valid[0], valid[-1] + 1) if valid else (0, 0)
    if groups and groups[-1][1] == r and tuple(groups[-1][2:]) == rows:
      groups[-1][1] = r + 1
    else:
      groups.append([r, r + 1, *rows])
  outputs = []
  for r0, r1, i0, i1 in groups:
    if i0 == i1:  # every kernel row falls in the padding
      outputs.append(jnp.zeros((n, r1 - r0, ow, o), jnp.result_type(x, kernel)))
      continue
    # Window order (kernel row, kernel column, channel) matches the kernel's rows i0:i1 flattened row-major.
    taps = []
    for i in range(i0, i1):
      top = r0 * sh + i - pt
      for j in range(kw):
        taps.append(lax.slice(x, (0, top, j, 0), (n, top + (r1 - r0 - 1) * sh + 1, j + (ow - 1) * sw + 1, c),
                              (1, sh, sw, 1)))
    patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
    outputs.append(lax.dot_general(patches, kernel[i0:i1].reshape(-1, o), (((3,), (0,)), ((), ()))))
  return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)


def conv2d_xla(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
               padding: Padding = ((0, 0), (0, 0))) -> jax.Array:
  """XLA's native convolution with the same arguments as `conv2d_im2col`."""
  return lax.conv_general_dilated(x, kernel, tuple(strides), tuple(tuple(p) for p in padding),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_xla_cpu(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
                   padding: Padding = ((0, 0), (0, 0))) -> jax.Array:
  """`conv2d_xla` whose kernel gradient reads materialised inputs (point 2 of the module docstring)."""
  return conv2d_xla(x, kernel, strides, padding)


def _conv2d_xla_cpu_fwd(x, kernel, strides, padding):
  return conv2d_xla(x, kernel, strides, padding), (x, kernel)


def _conv2d_xla_cpu_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  dx = jax.vjp(lambda x: conv2d_xla(x, kernel, strides, padding), x)[1](dy)[0]
  # Materialise the kernel gradient's inputs, so that XLA's transposes to channel-major order are plain copies
  # rather than fused into (and slowing down) their producers.
  x, dy = lax.optimization_barrier((x, dy))
  dk = jax.vjp(lambda k: conv2d_xla(x, k, strides, padding), kernel)[1](dy)[0]
  return dx, dk


conv2d_xla_cpu.defvjp(_conv2d_xla_cpu_fwd, _conv2d_xla_cpu_bwd)


def resolve_conv_impl(conv_impl: str, input_hw: Sequence[int], output_hw: Sequence[int],
                      backend: str | None = None, dtype=jnp.float32) -> str:
  """The implementation one layer runs: 'xla', 'xla_cpu', 'im2col' or 'onednn'.

  'xla', 'im2col' and 'onednn' are taken as asked (for comparisons). 'auto' is 'xla' off CPU. On CPU it is
  'onednn' for float32 and bfloat16 where `dem_jax.ops.onednn` is available (bfloat16 without native kernels still runs
  there in float32: XLA:CPU's own bfloat16 convolution is several times slower); otherwise 'im2col' where the input
  or the output map (the latter is what the backward convolution slides over) has at most SMALL_MAP_POSITIONS
  positions, and 'xla_cpu' elsewhere.
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}')
  backend = backend or jax.default_backend()
  if conv_impl == 'onednn' and backend != 'cpu':
    raise ValueError(f"conv_impl='onednn' runs on CPU only, this is {backend}; use 'auto' or 'xla'")
  if conv_impl != 'auto':
    return conv_impl
  if backend != 'cpu':
    return 'xla'
  if jnp.dtype(dtype) in (jnp.float32, jnp.bfloat16) and onednn_available():
    return 'onednn'
  positions = min(math.prod(input_hw), math.prod(output_hw))
  return 'im2col' if positions <= SMALL_MAP_POSITIONS else 'xla_cpu'


@functools.cache
def onednn_available() -> bool:
  """Whether the oneDNN convolutions load here; logs why not, once."""
  reason = onednn.unavailable_reason()
  if reason is not None:
    logging.warning("conv_impl='auto' runs XLA's convolutions on CPU (slower than oneDNN's; docs/benchmarks.md): %s",
                    reason)
  return reason is None


@functools.cache
def onednn_bf16_available() -> bool:
  """Whether oneDNN runs bfloat16 convolutions natively here; logs why not, once."""
  reason = onednn.bf16_unavailable_reason()
  if reason is not None:
    logging.warning('bfloat16 convolutions run on oneDNN in float32 (converted around each one): %s', reason)
  return reason is None


def conv2d_onednn_any_dtype(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
                            padding: Padding = ((0, 0), (0, 0))) -> jax.Array:
  """`onednn.conv2d_onednn`, with bfloat16 computed in float32 where the CPU lacks bfloat16 kernels."""
  if x.dtype == jnp.bfloat16 and not onednn_bf16_available():
    return onednn.conv2d_onednn(x.astype(jnp.float32), kernel.astype(jnp.float32), strides, padding).astype(x.dtype)
  return onednn.conv2d_onednn(x, kernel, strides, padding)


_CONV_FNS = {'xla': conv2d_xla, 'xla_cpu': conv2d_xla_cpu, 'im2col': conv2d_im2col,
             'onednn': conv2d_onednn_any_dtype}


def conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
           padding: Padding = ((0, 0), (0, 0)), conv_impl: str = 'auto') -> jax.Array:
  """2-D convolution (NHWC input, HWIO kernel, explicit padding) by the implementation this layer resolves to.

  Computes in x's dtype. A float32 kernel with bfloat16 input goes to oneDNN as it is (converted inside, its
  gradient kept in float32); the other implementations get it cast to x's dtype.
  """
  strides = tuple(strides)
  padding = tuple(tuple(p) for p in padding)
  out_hw = [(x.shape[1 + d] + sum(padding[d]) - kernel.shape[d]) // strides[d] + 1 for d in range(2)]
  impl = resolve_conv_impl(conv_impl, x.shape[1:3], out_hw, dtype=x.dtype)
  if impl != 'onednn':
    kernel = kernel.astype(x.dtype)
  return _CONV_FNS[impl](x, kernel, strides, padding)


def folds_norm(conv_impl: str, dtype, backend: str | None = None) -> bool:
  """Whether inference folds each BatchNorm (and the residual sum and ReLU after it) into the convolution before it
  (`conv2d_folded_norm`): where every layer runs on oneDNN in `dtype` natively, that is on CPU with the library
  loaded, in float32, or in bfloat16 where the CPU has bfloat16 kernels."""
  if resolve_conv_impl(conv_impl, (SMALL_MAP_POSITIONS + 1, 1), (SMALL_MAP_POSITIONS + 1, 1), backend,
                       dtype) != 'onednn':
    return False
  return jnp.dtype(dtype) == jnp.float32 or (jnp.dtype(dtype) == jnp.bfloat16 and onednn_bf16_available())


def _folded_norm_reference(x, kernel, mean, gain, bias, residual, strides, padding, relu):
  """The unfolded computation: the convolution in x's dtype, then (y - mean) * gain + bias in float32, the
  residual and the ReLU."""
  y = (onednn.conv2d_onednn(x, kernel, strides, padding).astype(jnp.float32) - mean) * gain + bias
  if residual is not None:
    y = y + residual.astype(jnp.float32)
  return (jnp.maximum(y, 0.0) if relu else y).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def conv2d_folded_norm(x: jax.Array, kernel: jax.Array, mean: jax.Array, gain: jax.Array, bias: jax.Array,
                       residual: jax.Array | None, strides: Sequence[int] = (1, 1),
                       padding: Padding = ((0, 0), (0, 0)), relu: bool = False) -> jax.Array:
  """A convolution followed by an inference-mode BatchNorm, (conv(x, kernel) - mean) * gain + bias per channel
  (float32 vectors), plus `residual` if given, then max(., 0) if `relu`, as one oneDNN call: the kernel scaled by
  `gain` and the bias bias - mean * gain.

  Computes in x's dtype, summing in float32 and rounding once (the unfolded form rounds the convolution's output
  and the BatchNorm's separately, so bfloat16 results differ by about a rounding). Where `folds_norm` is True only.
  Differentiable: the gradient is that of the unfolded form.
  """
  kernel = kernel.astype(jnp.float32) * gain
  return onednn.conv2d_bias_onednn(x, kernel, bias - mean * gain, strides, padding, residual, relu)


def _conv2d_folded_norm_fwd(x, kernel, mean, gain, bias, residual, strides, padding, relu):
  return (conv2d_folded_norm(x, kernel, mean, gain, bias, residual, strides, padding, relu),
          (x, kernel, mean, gain, bias, residual))


def _conv2d_folded_norm_bwd(strides, padding, relu, primals, dy):
  reference = functools.partial(_folded_norm_reference, strides=strides, padding=padding, relu=relu)
  return jax.vjp(reference, *primals)[1](dy)


conv2d_folded_norm.defvjp(_conv2d_folded_norm_fwd, _conv2d_folded_norm_bwd)


def _pool_taps(x: jax.Array, window: int, stride: int, pad: int):
  """x padded with -inf, the output size, and a function giving the strided slice of window position (i, j)."""
  n, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-jnp.inf)
  oh, ow = (h + 2 * pad - window) // stride + 1, (w + 2 * pad - window) // stride + 1
  tap = lambda i, j: lax.slice(padded, (0, i, j, 0), (n, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
                               (1, stride, stride, 1))
  return padded, (oh, ow), tap


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool_slices(x: jax.Array, window: int = 3, stride: int = 2, pad: int = 1) -> jax.Array:
  """Max-pooling over NHWC as an elementwise maximum of strided slices (the values of reduce_window's).

  Where several window elements tie for the maximum (all zeros after a ReLU, say), the gradient is shared equally
  between them instead of going to one.
  """
  _, _, tap = _pool_taps(x, window, stride, pad)
  out = None
  for i in range(window):
    for j in range(window):
      out = tap(i, j) if out is None else jnp.maximum(out, tap(i, j))
  return out


def _max_pool_slices_fwd(x, window, stride, pad):
  out = max_pool_slices(x, window, stride, pad)
  return out, (x, out)


def _max_pool_slices_bwd(window, stride, pad, residuals, dy):
  # Written out rather than left to autodiff: the derivative of the chain of maxima makes XLA recompute the chain
  # once per window position inside one fusion, which in bfloat16 took longer than all convolutions together.
  x, out = residuals
  padded, (oh, ow), tap = _pool_taps(x, window, stride, pad)
  hits = [[tap(i, j) == out for j in range(window)] for i in range(window)]
  count = sum(hit.astype(jnp.float32) for row in hits for hit in row)
  share = lax.optimization_barrier(dy.astype(jnp.float32) / count)  # once, not once per window position
  dx = None
  for i in range(window):
    for j in range(window):
      # Each output position sends its share back to the input element window position (i, j) read.
      part = lax.pad(jnp.where(hits[i][j], share, 0.0), jnp.float32(0), (
          (0, 0, 0), (i, padded.shape[1] - i - (oh - 1) * stride - 1, stride - 1),
          (j, padded.shape[2] - j - (ow - 1) * stride - 1, stride - 1), (0, 0, 0)))
      dx = part if dx is None else dx + part
  h, w = x.shape[1:3]
  return (dx[:, pad:pad + h, pad:pad + w].astype(x.dtype),)


max_pool_slices.defvjp(_max_pool_slices_fwd, _max_pool_slices_bwd)


def max_pool(x: jax.Array, conv_impl: str = 'auto', window: int = 3, stride: int = 2, pad: int = 1) -> jax.Array:
  """Max-pooling through reduce_window ('xla', and 'auto' off CPU), the native loops of `onednn.max_pool_native`
  ('onednn', and 'auto' on CPU where the library loads) or `max_pool_slices` (otherwise)."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}')
  if conv_impl == 'xla' or (conv_impl == 'auto' and jax.default_backend() != 'cpu'):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
                             ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  native = conv_impl == 'onednn' or (conv_impl == 'auto' and onednn_available())
  if native and x.dtype in (jnp.float32, jnp.bfloat16):
    return onednn.max_pool_native(x, window, stride, pad)
  return max_pool_slices(x, window, stride, pad)
