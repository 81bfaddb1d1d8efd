"""oneDNN's convolutions, a native max-pooling and per-channel sums as XLA FFI custom calls: what `ops` runs on CPU.

Why: this jaxlib runs convolutions on CPU through YNNPACK (or Eigen), whose kernels are slower than oneDNN's on
ResNet18's layers (docs/benchmarks.md), most of all the kernel gradient, which also needs its inputs transposed
first. PyTorch calls oneDNN, so no formulation built from XLA ops (im2col, shifted matrix products, Winograd)
caught up with it. Calling oneDNN from the compiled step does: activations stay in XLA's NHWC buffers, and XLA still
fuses everything around the convolutions (BatchNorm, ReLU, the optimizer).

Activations are float32 or bfloat16. In bfloat16 the kernel may stay float32: oneDNN converts it while reordering
it to its blocked layout, accumulates in float32, and returns the kernel gradient in float32. bfloat16 runs only
where oneDNN has native bfloat16 kernels (AVX512-BF16 or AMX): `bf16_available()` / `bf16_unavailable_reason()`.

`max_pool_native` is max-pooling and its gradient in the same library: plain loops over NHWC, one pass forward and
two back, where XLA:CPU made several over the network's largest activation (a large share of the bfloat16 training
step; docs/benchmarks.md). `channel_sums` gives BatchNorm (`ops.norm`) its per-channel sums, read straight from
bfloat16.

The handlers live in `native/onednn_conv.cc`. `load()` compiles that file once per environment with the C++
compiler (`$CXX`, else g++) against jaxlib's FFI headers and the oneDNN wheels that setup.cfg installs on Linux
x86_64 (or a oneDNN under `$DNNLROOT`), caches the library under the environment's lib/ (else ~/.cache/dem_jax)
beside its sha256 digest, and registers the handlers with XLA. A cached library is loaded only if it is owned by
this user (or root), writable by no one else, and matches its recorded digest; otherwise it is rebuilt.
A build says so in one warning line; `python -m dem_jax.ops.onednn` (which `./launch.sh setup` runs) builds it up
front. Where any of that fails, `available()` is False, `unavailable_reason()` says why, and `ops.conv` falls back
to XLA's convolution. DEM_JAX_ONEDNN=0 turns the path off.

    python -m dem_jax.ops.onednn   # build (if needed), load, and print where the library is or why it is unavailable
"""

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).resolve().parent / 'native' / 'onednn_conv.cc'
TARGETS = {'forward': 'DemOnednnConvForward', 'backward_data': 'DemOnednnConvBackwardData',
           'backward_weights': 'DemOnednnConvBackwardWeights', 'bias': 'DemOnednnConvBias',
           'bias_add': 'DemOnednnConvBiasAdd', 'max_pool': 'DemMaxPoolForward',
           'max_pool_backward': 'DemMaxPoolBackward', 'channel_sums': 'DemChannelSums',
           'masked_channel_sums': 'DemMaskedChannelSums'}
BF16_QUERY = 'DemOnednnBf16Kernels'
DISABLE_ENV = 'DEM_JAX_ONEDNN'
LIBRARY_PREFIX = 'libdem_onednn_conv-'

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
      "`pip install 'dem_jax[onednn]'` installs them (the onednn-cpu-gomp and onednn-devel-cpu-gomp wheels; "
      '`./launch.sh setup` in a checkout), elsewhere set DNNLROOT to a oneDNN 3.x install')


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
  return _cache_dir() / f'{LIBRARY_PREFIX}{digest.hexdigest()[:16]}.so'


def digest_path(library: pathlib.Path) -> pathlib.Path:
  """Where the sha256 of `library`, recorded when it was built, lives."""
  return library.with_name(library.name + '.sha256')


def _file_digest(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _owner_and_mode_reason(path, info: os.stat_result) -> str | None:
  if not stat.S_ISREG(info.st_mode):
    return f'{path} is not a regular file'
  if info.st_uid not in (os.getuid(), 0):
    return f'{path} is owned by user id {info.st_uid}, not by this user ({os.getuid()}) or root'
  if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
    return f'{path} is writable by its group or by others (mode {stat.filemode(info.st_mode)})'
  return None


def _folder_reason(folder: pathlib.Path) -> str | None:
  """Why files in `folder` cannot be trusted: another user could replace them there (a sticky folder, such as /tmp,
  lets no one replace another's files)."""
  try:
    info = folder.stat()
  except OSError as e:
    return f'its folder {folder} cannot be read ({e.strerror})'
  if info.st_uid not in (os.getuid(), 0):
    return f'its folder {folder} is owned by user id {info.st_uid}, not by this user ({os.getuid()}) or root'
  if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
    return (f'its folder {folder} is writable by its group or by others (mode {stat.filemode(info.st_mode)}), so '
            'another user could swap the library; make it writable by its owner only (chmod go-w)')
  return None


def _open_verified(library: pathlib.Path) -> tuple[int | None, str | None]:
  """(a file descriptor of `library`, None) once its folder, owner, mode and sha256 are checked, or (None, why not).

  The checks and the load go through one open file, so the library cannot be swapped between them.
  """
  reason = _folder_reason(library.parent)
  if reason:
    return None, reason
  digest_file = digest_path(library)
  try:
    reason = _owner_and_mode_reason(digest_file, digest_file.lstat())
  except FileNotFoundError:
    reason = f'{digest_file} does not exist'
  if reason:
    return None, reason
  try:
    fd = os.open(library, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
  except FileNotFoundError:
    return None, f'{library} does not exist'
  except OSError as e:
    return None, f'{library} cannot be opened ({e.strerror}; a symbolic link is not followed)'
  try:
    reason = _owner_and_mode_reason(library, os.fstat(fd))
    if reason is None:
      with os.fdopen(os.dup(fd), 'rb') as f:
        digest = hashlib.file_digest(f, 'sha256').hexdigest()
      recorded = digest_file.read_text().split()
      if not recorded or recorded[0] != digest:
        reason = f'{library} does not match the sha256 recorded in {digest_file.name} when it was built'
  except BaseException:
    os.close(fd)
    raise
  if reason:
    os.close(fd)
    return None, reason
  return fd, None


def untrusted_reason(library: pathlib.Path) -> str | None:
  """Why the cached `library` must not be loaded (None: it may be).

  Loading a shared library runs its code, so it (and its digest) must be owned by this user or root, writable by
  no one else, in a folder no one else can write to, and match the digest recorded when it was built.
  """
  fd, reason = _open_verified(library)
  if fd is not None:
    os.close(fd)
  return reason


def _remove_other_builds(keep: pathlib.Path) -> None:
  """Removes libraries of other sources from the cache folder (a process that loaded one keeps its mapping)."""
  for old in keep.parent.glob(f'{LIBRARY_PREFIX}*.so*'):
    if old.name not in (keep.name, digest_path(keep).name):
      try:
        old.unlink()
      except OSError:
        pass


def build(force: bool = False) -> pathlib.Path:
  """Compiles `native/onednn_conv.cc` unless a trusted build is cached (`untrusted_reason`); returns its path."""
  root = _find_onednn()
  out = library_path(root)
  reason = None
  if not force and out.exists():
    reason = untrusted_reason(out)
    if reason is None:
      return out
  cxx = os.environ.get('CXX', 'g++')
  if shutil.which(cxx) is None:
    raise OnednnUnavailable(f'no C++ compiler {cxx!r} to build {SOURCE.name}; install g++ or set CXX')
  # The first use after an install waits for the compiler: one line says why, only when it compiles.
  logging.warning('dem_jax: building the oneDNN convolution library (once, a few seconds) in %s%s', out,
                  f' (the cached one is not loaded: {reason})' if reason else '')
  lib_dir = root / 'lib'
  # Written next to its final name and renamed, so concurrent builders never load a half-written file.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=out.parent)
  os.close(fd)
  cmd = [cxx, '-O3', '-std=c++17', '-shared', '-fPIC', '-fopenmp', '-Wall', '-isystem', jax.ffi.include_dir(),
         '-I', str(root / 'include'), str(SOURCE), '-o', tmp, f'-L{lib_dir}', '-l:libdnnl.so.3',
         f'-Wl,-rpath,{lib_dir}']
  result = subprocess.run(cmd, capture_output=True, text=True)
  if result.returncode != 0:
    os.unlink(tmp)
    raise OnednnUnavailable(f'building {SOURCE.name} failed ({" ".join(cmd)}):\n{result.stderr[-3000:]}')
  os.chmod(tmp, 0o755)
  # The digest goes in first: a library without one is never loaded, so a concurrent reader either sees the old
  # pair, or a new library whose digest is already there.
  fd, tmp_digest = tempfile.mkstemp(suffix='.sha256', dir=out.parent)
  with os.fdopen(fd, 'w') as f:
    f.write(f'{_file_digest(pathlib.Path(tmp))}  {out.name}\n')
  os.chmod(tmp_digest, 0o644)
  os.replace(tmp_digest, digest_path(out))
  os.replace(tmp, out)
  _remove_other_builds(out)
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
      fd, reason = _open_verified(path)
      if reason is not None:  # e.g. replaced between build() and here
        raise OnednnUnavailable(f'refusing to load the oneDNN convolution library: {reason}')
      # The very file that was checked. The descriptor stays open for the process's life: the loader knows a
      # library by its path name, and a closed descriptor's number (so its /proc path) could name another file.
      try:
        lib = ctypes.CDLL(f'/proc/self/fd/{fd}')
      except OSError as e:
        os.close(fd)
        raise OnednnUnavailable(f'cannot load {path}: {e}') from e
      missing = [symbol for symbol in TARGETS.values() if not hasattr(lib, symbol)]
      if missing:
        raise OnednnUnavailable(f'{path} lacks {", ".join(missing)}; delete it to have it rebuilt')
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


def bf16_unavailable_reason() -> str | None:
  """Why bfloat16 convolutions cannot run on oneDNN here (None: they can; they need AVX512-BF16 or AMX)."""
  reason = unavailable_reason()
  if reason is not None:
    return reason
  with _lock:
    if 'bf16' not in _state:
      lib = _state['lib']
      if not hasattr(lib, BF16_QUERY):
        _state['bf16'] = f'the oneDNN convolution library lacks {BF16_QUERY}'
      else:
        query = getattr(lib, BF16_QUERY)
        query.restype, query.argtypes = ctypes.c_int, [ctypes.c_char_p, ctypes.c_size_t]
        message = ctypes.create_string_buffer(1024)
        native = query(message, len(message))
        _state['bf16'] = None if native else message.value.decode(errors='replace')
        _state['bf16_kernels'] = message.value.decode(errors='replace') if native else None
    return _state['bf16']


def bf16_available() -> bool:
  """Whether `conv2d_onednn` takes bfloat16 activations here."""
  return bf16_unavailable_reason() is None


def _output_shape(x_shape, kernel_shape, strides, padding) -> tuple[int, int, int, int]:
  n, h, w, _ = x_shape
  kh, kw, _, o = kernel_shape
  return (n, (h + sum(padding[0]) - kh) // strides[0] + 1, (w + sum(padding[1]) - kw) // strides[1] + 1, o)


def _call(target: str, out_shape, out_dtype, *args: jax.Array, strides, padding, **extra) -> jax.Array:
  (pad_top, pad_bottom), (pad_left, pad_right) = padding
  attrs = dict(stride_h=strides[0], stride_w=strides[1], pad_top=pad_top, pad_bottom=pad_bottom, pad_left=pad_left,
               pad_right=pad_right, **extra)
  return jax.ffi.ffi_call(TARGETS[target], jax.ShapeDtypeStruct(out_shape, out_dtype), vmap_method='sequential')(
      *args, **{k: np.int64(v) for k, v in attrs.items()})


def _check(x: jax.Array, kernel: jax.Array) -> None:
  if x.ndim != 4 or kernel.ndim != 4 or x.shape[3] != kernel.shape[2]:
    raise ValueError(f'conv2d_onednn: expected NHWC input and HWIO kernel with matching channels, got '
                     f'{x.shape} and {kernel.shape}')
  if x.dtype not in (jnp.float32, jnp.bfloat16) or kernel.dtype not in (jnp.float32, x.dtype):
    raise ValueError(f'conv2d_onednn takes float32 or bfloat16 input with a float32 kernel (or one of the '
                     f"input's type), got {x.dtype} and {kernel.dtype}; use conv_impl='xla' for other dtypes")
  load()
  if x.dtype == jnp.bfloat16 and not bf16_available():
    raise OnednnUnavailable(f'no bfloat16 convolutions on oneDNN here: {bf16_unavailable_reason()}; compute in '
                            'float32 (model.dtype=float32)')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_onednn(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
                  padding: Padding = ((0, 0), (0, 0))) -> jax.Array:
  """Same result as `lax.conv_general_dilated` with NHWC input, HWIO kernel and explicit padding, on oneDNN.

  x float32 or bfloat16 (the output's type), kernel float32 or x's type; oneDNN accumulates in float32. CPU only;
  differentiable in x and kernel, each gradient in its argument's type. Raises OnednnUnavailable where the library
  cannot be loaded, or for bfloat16 where `bf16_available()` is False.
  """
  _check(x, kernel)
  return _call('forward', _output_shape(x.shape, kernel.shape, strides, padding), x.dtype, x, kernel,
               strides=strides, padding=padding)


def _conv2d_onednn_fwd(x, kernel, strides, padding):
  return conv2d_onednn(x, kernel, strides, padding), (x, kernel)


def _conv2d_onednn_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  dx = _call('backward_data', x.shape, x.dtype, dy, kernel, strides=strides, padding=padding)
  if kernel.shape[:2] == (1, 1) and tuple(strides) != (1, 1) and not any(map(any, padding)):
    # A strided 1x1 convolution reads only every stride-th position: its kernel gradient is that of a stride-1
    # convolution over those positions, which oneDNN computes several times faster (most of all in bfloat16).
    x = x[:, :(dy.shape[1] - 1) * strides[0] + 1:strides[0], :(dy.shape[2] - 1) * strides[1] + 1:strides[1]]
    strides = (1, 1)
  dkernel = _call('backward_weights', kernel.shape, kernel.dtype, x, dy, strides=strides, padding=padding)
  return dx, dkernel


conv2d_onednn.defvjp(_conv2d_onednn_fwd, _conv2d_onednn_bwd)


def conv2d_bias_onednn(x: jax.Array, kernel: jax.Array, bias: jax.Array, strides: Sequence[int] = (1, 1),
                       padding: Padding = ((0, 0), (0, 0)), residual: jax.Array | None = None,
                       relu: bool = False) -> jax.Array:
  """conv2d_onednn(x, kernel) + bias (float32, one value per output channel), plus `residual` (the output's shape
  and type) if given, then max(., 0) if `relu`: one oneDNN inference call that writes its output once, summing in
  float32 and rounding once to x's type. Not differentiable (`ops.conv.conv2d_folded_norm` is)."""
  _check(x, kernel)
  out_shape = _output_shape(x.shape, kernel.shape, strides, padding)
  if bias.shape != (out_shape[3],):
    raise ValueError(f'conv2d_bias_onednn: the bias must have shape ({out_shape[3]},), got {bias.shape}')
  if residual is not None and (residual.shape != out_shape or residual.dtype != x.dtype):
    raise ValueError(f'conv2d_bias_onednn: the residual must be {x.dtype}{out_shape}, got '
                     f'{residual.dtype}{residual.shape}')
  args = (x, kernel, bias.astype(jnp.float32)) + (() if residual is None else (residual,))
  return _call('bias' if residual is None else 'bias_add', out_shape, x.dtype, *args, strides=strides,
               padding=padding, relu=int(relu))


def _pool_call(target: str, out_like, *args, window: int, stride: int, pad: int) -> jax.Array:
  return jax.ffi.ffi_call(TARGETS[target], jax.ShapeDtypeStruct(out_like.shape, out_like.dtype),
                          vmap_method='sequential')(*args, window=np.int64(window), stride=np.int64(stride),
                                                    pad=np.int64(pad))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool_native(x: jax.Array, window: int = 3, stride: int = 2, pad: int = 1) -> jax.Array:
  """Max-pooling of NHWC float32 or bfloat16 `x` over window x window, padded by `pad` on every side (padding
  never wins); the same values and gradient as `ops.conv.max_pool_slices`: an output's gradient is shared equally
  among the window elements tied for its maximum. CPU only; raises OnednnUnavailable where the library cannot load.
  """
  if x.ndim != 4 or x.dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f'max_pool_native takes NHWC float32 or bfloat16 input, got {x.dtype} of shape {x.shape}')
  if not 0 <= pad < window or stride < 1:
    raise ValueError(f'max_pool_native: need 0 <= pad < window and stride >= 1, got window={window}, '
                     f'stride={stride}, pad={pad}')
  load()
  n, h, w, c = x.shape
  out = jax.ShapeDtypeStruct((n, (h + 2 * pad - window) // stride + 1, (w + 2 * pad - window) // stride + 1, c),
                             x.dtype)
  return _pool_call('max_pool', out, x, window=window, stride=stride, pad=pad)


def _max_pool_native_fwd(x, window, stride, pad):
  y = max_pool_native(x, window, stride, pad)
  return y, (x, y)


def _max_pool_native_bwd(window, stride, pad, residuals, dy):
  x, y = residuals
  return (_pool_call('max_pool_backward', x, x, y, dy.astype(x.dtype), window=window, stride=stride, pad=pad),)


max_pool_native.defvjp(_max_pool_native_fwd, _max_pool_native_bwd)


def channel_sums(a: jax.Array, b: jax.Array, where: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(sum(a), sum(a * b)) over every axis but the last, float32, for float32 or bfloat16 arrays of one shape and
  type; with `where`, only over the positions where it is > 0. Read as they are (XLA:CPU would first copy bfloat16
  into float32) and summed in a fixed order. Not differentiable; CPU only."""
  arrays = (a, b) if where is None else (a, b, where)
  if any(x.shape != a.shape or x.dtype != a.dtype for x in arrays) or a.dtype not in (jnp.float32, jnp.bfloat16) \
      or a.ndim < 1:
    raise ValueError('channel_sums takes float32 or bfloat16 arrays of one shape and type, got '
                     + ', '.join(f'{x.dtype}{x.shape}' for x in arrays))
  load()
  target = TARGETS['channel_sums' if where is None else 'masked_channel_sums']
  sums = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((2, a.shape[-1]), jnp.float32),
                          vmap_method='sequential')(*arrays)
  return sums[0], sums[1]


def main() -> None:
  """Builds (if needed) and loads the library; prints where it is and what bfloat16 runs on, or why it cannot."""
  reason = unavailable_reason()
  if reason is None:
    print(f'oneDNN convolutions: {build()}')
    bf16_reason = bf16_unavailable_reason()
    print(f'bfloat16: {_state["bf16_kernels"]}' if bf16_reason is None else f'bfloat16 unavailable: {bf16_reason}')
  else:
    print(f'oneDNN convolutions unavailable: {reason}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  main()
