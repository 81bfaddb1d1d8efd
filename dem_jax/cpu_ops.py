"""2-D convolution as im2col + one matrix multiply, for XLA:CPU.

Why this exists: XLA:CPU's native convolution is slow on ResNet's late layers (small spatial maps, many channels;
about 1 GFLOP/s for a 3x3 512->512 conv on a 2x4 map), while its matrix multiply is fast. Rewriting the conv as
"gather the KH*KW shifted windows side by side, then one dot" costs a copy of the input per kernel tap but turns
every layer into a large GEMM. Built from pad, strided slices, concatenate and dot_general only, so it is
differentiable by JAX and its gradient is again a pair of GEMMs. On GPU/TPU the native convolution is better, so
`conv_impl='auto'` picks this only on the CPU backend (see `resolve_conv_impl`).
"""

import ctypes
import math
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp

CONV_IMPLS = ('auto', 'xla', 'im2col')

Padding = Sequence[tuple[int, int]]


def conv2d_im2col(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
                  padding: Padding = ((0, 0), (0, 0)), precision=None) -> jax.Array:
  """Same result as `lax.conv_general_dilated` with NHWC input, HWIO kernel and explicit padding.

  Args:
    x: [N, H, W, C] input.
    kernel: [KH, KW, C, O] kernel.
    strides: (SH, SW).
    padding: ((top, bottom), (left, right)) zero padding.
    precision: passed to the dot.

  Returns:
    [N, OH, OW, O] output, OH = (H + top + bottom - KH) // SH + 1 (likewise OW).
  """
  kh, kw, c, o = kernel.shape
  if x.shape[-1] != c:
    raise ValueError(f'input has {x.shape[-1]} channels, kernel expects {c}')
  sh, sw = strides
  (pt, pb), (pl, pr) = padding
  if pt or pb or pl or pr:
    x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  n, h, w, _ = x.shape
  oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
  if kh == kw == 1:
    patches = x[:, :(oh - 1) * sh + 1:sh, :(ow - 1) * sw + 1:sw, :]
  else:
    # Tap order (i, j, c) matches the HWIO kernel flattened row-major, so one reshape of the kernel fits.
    taps = [lax.slice(x, (0, i, j, 0), (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c), (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(taps, axis=-1)
  y = lax.dot_general(patches, kernel.reshape(kh * kw * c, o), (((3,), (0,)), ((), ())), precision=precision)
  return y


def conv2d_xla(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
               padding: Padding = ((0, 0), (0, 0)), precision=None) -> jax.Array:
  """XLA's native convolution with the same arguments as `conv2d_im2col`."""
  return lax.conv_general_dilated(x, kernel, tuple(strides), tuple(tuple(p) for p in padding),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=precision)


# XLA:CPU's native convolution collapses to ~5 GFLOP/s (against ~100-200 elsewhere) when its input feature map has
# at most this many positions, e.g. ResNet's last stage on short tiles (2x4) and, in the backward pass, the
# stride-2 layer that produces such a map. Measured with jaxlib 0.12 on AVX-512 x86; im2col runs those at 100+.
SMALL_MAP_POSITIONS = 8


def resolve_conv_impl(conv_impl: str, input_hw: Sequence[int], output_hw: Sequence[int],
                      backend: str | None = None) -> str:
  """Picks 'xla' or 'im2col' for one layer.

  'auto' is XLA's native convolution on GPU/TPU, and on CPU too except where XLA:CPU's convolution is pathological:
  layers whose input or output map (the latter is the input of the backward convolution) has at most
  SMALL_MAP_POSITIONS positions. Elsewhere XLA:CPU's own convolution beats im2col, whose window copy costs more
  than it saves on large maps.
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}')
  if conv_impl != 'auto':
    return conv_impl
  if (backend or jax.default_backend()) != 'cpu':
    return 'xla'
  positions = min(math.prod(input_hw), math.prod(output_hw))
  return 'im2col' if positions <= SMALL_MAP_POSITIONS else 'xla'


def conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
           padding: Padding = ((0, 0), (0, 0)), conv_impl: str = 'auto', precision=None) -> jax.Array:
  """2-D convolution (NHWC input, HWIO kernel) through the implementation chosen for this layer."""
  kh, kw = kernel.shape[:2]
  out_hw = [(x.shape[1 + d] + sum(padding[d]) - k) // strides[d] + 1 for d, k in enumerate((kh, kw))]
  impl = resolve_conv_impl(conv_impl, x.shape[1:3], out_hw)
  fn = conv2d_im2col if impl == 'im2col' else conv2d_xla
  return fn(x, kernel, strides, padding, precision=precision)


def max_pool_slices(x: jax.Array, window: int = 3, stride: int = 2, pad: int = 1) -> jax.Array:
  """Max-pooling over NHWC as an elementwise maximum of strided slices (same values as `nn.max_pool`).

  Why: XLA:CPU lowers reduce_window's gradient (select_and_scatter) through iota/argmax tuples and a scatter, about
  5x slower than this form's gradient (masks and pads, all fused) on the ResNet stem's output. Where several window
  elements tie for the maximum, the gradient is shared between them instead of going to one.
  """
  n, h, w, c = x.shape
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-jnp.inf)
  oh, ow = (h + 2 * pad - window) // stride + 1, (w + 2 * pad - window) // stride + 1
  out = None
  for i in range(window):
    for j in range(window):
      tap = lax.slice(x, (0, i, j, 0), (n, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
                      (1, stride, stride, 1))
      out = tap if out is None else jnp.maximum(out, tap)
  return out


def max_pool(x: jax.Array, conv_impl: str = 'auto', window: int = 3, stride: int = 2, pad: int = 1) -> jax.Array:
  """Max-pooling through XLA's reduce_window ('xla', and 'auto' off CPU) or `max_pool_slices` (otherwise)."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}')
  if conv_impl == 'xla' or (conv_impl == 'auto' and jax.default_backend() != 'cpu'):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
                             ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  return max_pool_slices(x, window, stride, pad)


def retain_freed_memory() -> bool:
  """Lets glibc's malloc keep freed memory for reuse instead of unmapping it; returns whether that applied.

  Why: XLA:CPU allocates every execution's temporary buffer (about 0.5 GB for a full-width ResNet18 triplet step)
  with malloc. Blocks that large are mmap'ed and unmapped per call, so each step touches fresh pages and pays one
  page fault per 4 KiB, on a VM a sizeable part of the step. Process-wide and harmless off CPU (device memory is
  not malloc'ed); it only means the process keeps its peak host memory. No-op where glibc is absent.
  """
  try:
    libc = ctypes.CDLL('libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  m_trim_threshold, m_mmap_max = -1, -4
  return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))
