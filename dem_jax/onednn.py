"""oneDNN's convolutions as XLA FFI custom calls: the convolution `cpu_ops` runs on CPU when they are available.

Why: this jaxlib runs convolutions on CPU through YNNPACK (or Eigen), whose kernels are 15-75% slower than oneDNN's
on ResNet18's layers, most of all the kernel gradient, which also needs its inputs transposed first. PyTorch calls
oneDNN, so no formulation built from XLA ops (im2col, shifted matrix products, Winograd) caught up with it. Calling
oneDNN from the compiled step does: activations stay in XLA's NHWC buffers, and XLA still fuses everything around
the convolutions (BatchNorm, ReLU, the optimizer).

The three handlers live in `native/onednn_conv.cc`. `load()` compiles that file once per environment with the C++
compiler (`$CXX`, else g++) against jaxlib's FFI headers and the oneDNN wheels that setup.cfg installs on Linux
x86_64 (or a oneDNN under `$DNNLROOT`), caches the library under the environment's lib/ (else ~/.cache/dem_jax),
and registers the handlers with XLA. `./launch.sh setup` builds it up front. Where any of that fails, `available()`
is False, `unavailable_reason()` says why, and `cpu_ops` falls back to XLA's convolution. DEM_JAX_ONEDNN=0 turns
the path off.

    python -m dem_jax.onednn   # build (if needed), load, and print where the library is or why it is unavailable
"""

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).resolve().parent / 'native' / 'onednn_conv.cc'
TARGETS = {'forward': 'DemOnednnConvForward', 'backward_data': 'DemOnednnConvBackwardData',
           'backward_weights': 'DemOnednnConvBackwardWeights'}
DISABLE_ENV = 'DEM_JAX_ONEDNN'

Padding = Sequence[tuple[int, int]]


class OnednnUnavailable(RuntimeError):
  """The oneDNN convolutions cannot be built or loaded here; the message says why and what to do."""


def _find_onednn() -> pathlib.Path:
  """The prefix holding include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so.3: $DNNLROOT, else this environment."""
  roots = [pathlib.Path(os.environ['DNNLROOT'])] if os.environ.get('DNNLROOT') else []
  roots.append(pathlib.Path(sys.prefix))
  for root in roots:
    if (root / 'include' / 'oneapi' / 'dnnl' / 'dnnl.hpp').exists() and (root / 'lib' / 'libdnnl.so.3').exists():
      return root
  raise OnednnUnavailable(
      f'oneDNN headers and library not found under {" or ".join(str(r) for r in roots)}; on Linux x86_64 '
      '`./launch.sh setup` installs them (the onednn-cpu-gomp and onednn-devel-cpu-gomp wheels), elsewhere set '
      'DNNLROOT to a oneDNN 3.x install')


def _cache_dir() -> pathlib.Path:
  env_lib = pathlib.Path(sys.prefix) / 'lib' / 'dem_jax'
  try:
    env_lib.mkdir(parents=True, exist_ok=True)
    if os.access(env_lib, os.W_OK):
      return env_lib
  except OSError:
    pass
  home = pathlib.Path.home() / '.cache' / 'dem_jax'
  home.mkdir(parents=True, exist_ok=True)
  return home


def library_path(onednn_root: pathlib.Path) -> pathlib.Path:
  """Where the compiled handlers for this source, jaxlib and oneDNN go (a new name whenever one of them changes)."""
  digest = hashlib.sha256()
  digest.update(SOURCE.read_bytes())
  digest.update(jax.__version__.encode())
  digest.update(str((onednn_root / 'lib' / 'libdnnl.so.3').resolve()).encode())
  return _cache_dir() / f'libdem_onednn_conv-{digest.hexdigest()[:16]}.so'


def build(force: bool = False) -> pathlib.Path:
  """Compiles `native/onednn_conv.cc` unless it is already built; returns the library's path."""
  root = _find_onednn()
  out = library_path(root)
  if out.exists() and not force:
    return out
  cxx = os.environ.get('CXX', 'g++')
  if shutil.which(cxx) is None:
    raise OnednnUnavailable(f'no C++ compiler {cxx!r} to build {SOURCE.name}; install g++ or set CXX')
  lib_dir = root / 'lib'
  # Written next to its final name and renamed, so concurrent builders never load a half-written file.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=out.parent)
  os.close(fd)
  cmd = [cxx, '-O2', '-std=c++17', '-shared', '-fPIC', '-Wall', '-isystem', jax.ffi.include_dir(),
         '-I', str(root / 'include'), str(SOURCE), '-o', tmp, f'-L{lib_dir}', '-l:libdnnl.so.3',
         f'-Wl,-rpath,{lib_dir}']
  result = subprocess.run(cmd, capture_output=True, text=True)
  if result.returncode != 0:
    os.unlink(tmp)
    raise OnednnUnavailable(f'building {SOURCE.name} failed ({" ".join(cmd)}):\n{result.stderr[-3000:]}')
  os.replace(tmp, out)
  return out


_lock = threading.Lock()
_state: dict = {}


def load() -> ctypes.CDLL:
  """Builds if needed, loads the library and registers its handlers with XLA (once per process)."""
  with _lock:
    if 'lib' in _state:
      return _state['lib']
    if 'error' in _state:
      raise _state['error']
    try:
      if os.environ.get(DISABLE_ENV, '1') == '0':
        raise OnednnUnavailable(f'turned off by {DISABLE_ENV}=0')
      if not sys.platform.startswith('linux'):
        raise OnednnUnavailable(f'built for Linux only (this is {sys.platform})')
      try:
        path = build()
      except OSError as e:  # an unwritable cache folder, say
        raise OnednnUnavailable(f'cannot build {SOURCE.name}: {e}') from e
      try:
        lib = ctypes.CDLL(str(path))
      except OSError as e:
        raise OnednnUnavailable(f'cannot load {path}: {e}') from e
      for symbol in TARGETS.values():
        jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
    except OnednnUnavailable as e:
      _state['error'] = e
      raise
    _state['lib'] = lib
    return lib


def available() -> bool:
  """Whether `conv2d_onednn` can run here (builds and loads on the first call)."""
  return unavailable_reason() is None


def unavailable_reason() -> str | None:
  """Why `available()` is False, or None when it is True."""
  try:
    load()
    return None
  except OnednnUnavailable as e:
    return str(e)


def _output_shape(x_shape, kernel_shape, strides, padding) -> tuple[int, int, int, int]:
  n, h, w, _ = x_shape
  kh, kw, _, o = kernel_shape
  return (n, (h + sum(padding[0]) - kh) // strides[0] + 1, (w + sum(padding[1]) - kw) // strides[1] + 1, o)


def _call(target: str, out_shape, a: jax.Array, b: jax.Array, strides, padding) -> jax.Array:
  (pad_top, pad_bottom), (pad_left, pad_right) = padding
  attrs = dict(stride_h=strides[0], stride_w=strides[1], pad_top=pad_top, pad_bottom=pad_bottom, pad_left=pad_left,
               pad_right=pad_right)
  return jax.ffi.ffi_call(TARGETS[target], jax.ShapeDtypeStruct(out_shape, jnp.float32), vmap_method='sequential')(
      a, b, **{k: np.int64(v) for k, v in attrs.items()})


def _check(x: jax.Array, kernel: jax.Array) -> None:
  if x.ndim != 4 or kernel.ndim != 4 or x.shape[3] != kernel.shape[2]:
    raise ValueError(f'conv2d_onednn: expected NHWC input and HWIO kernel with matching channels, got '
                     f'{x.shape} and {kernel.shape}')
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
    raise ValueError(f'conv2d_onednn computes in float32 only, got {x.dtype} and {kernel.dtype}; use '
                     "conv_impl='xla' for other dtypes")
  load()


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_onednn(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
                  padding: Padding = ((0, 0), (0, 0))) -> jax.Array:
  """Same result as `lax.conv_general_dilated` with NHWC input, HWIO kernel and explicit padding, on oneDNN.

  float32, CPU only; differentiable in x and kernel. Raises OnednnUnavailable where the library cannot be loaded.
  """
  _check(x, kernel)
  return _call('forward', _output_shape(x.shape, kernel.shape, strides, padding), x, kernel, strides, padding)


def _conv2d_onednn_fwd(x, kernel, strides, padding):
  return conv2d_onednn(x, kernel, strides, padding), (x, kernel)


def _conv2d_onednn_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  dx = _call('backward_data', x.shape, dy, kernel, strides, padding)
  dkernel = _call('backward_weights', kernel.shape, x, dy, strides, padding)
  return dx, dkernel


conv2d_onednn.defvjp(_conv2d_onednn_fwd, _conv2d_onednn_bwd)


if __name__ == '__main__':
  reason = unavailable_reason()
  if reason is None:
    print(f'oneDNN convolutions: {build()}')
  else:
    print(f'oneDNN convolutions unavailable: {reason}', file=sys.stderr)
    sys.exit(1)
