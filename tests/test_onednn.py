"""The oneDNN convolution library: it is built and loaded where it should be, says why where it cannot be, and a
cached build is loaded only when it is this user's, writable by no one else, and the one recorded at build time."""

import hashlib
import json
import os
import platform
import stat
import subprocess
import sys

os.environ.setdefault('JAX_NUM_CPU_DEVICES', '4')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dem_jax.ops import conv as conv_ops  # noqa: E402
from dem_jax.ops import onednn  # noqa: E402


@pytest.mark.skipif(not (sys.platform.startswith('linux') and platform.machine() == 'x86_64'),
                    reason='setup.cfg installs oneDNN on Linux x86_64 only')
def test_library_is_built_and_loaded_on_linux_x86_64():
  assert onednn.unavailable_reason() is None
  assert onednn.build().exists()


def test_turned_off_by_the_environment_variable(monkeypatch):
  monkeypatch.setattr(onednn, '_state', {})
  monkeypatch.setenv(onednn.DISABLE_ENV, '0')
  assert not onednn.available()
  assert 'DEM_JAX_ONEDNN=0' in onednn.unavailable_reason()


def test_unavailable_library_is_reported_with_its_reason(monkeypatch, caplog):
  monkeypatch.setattr(onednn, '_state', {'error': onednn.OnednnUnavailable('no compiler here')})
  with caplog.at_level('WARNING'):
    assert conv_ops.onednn_available.__wrapped__() is False
  assert 'no compiler here' in caplog.text and "XLA's convolutions" in caplog.text
  with pytest.raises(onednn.OnednnUnavailable, match='no compiler here'):
    onednn.conv2d_onednn(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 2)))


def test_missing_compiler_is_named(monkeypatch):
  monkeypatch.setenv('CXX', 'no-such-compiler-here')
  with pytest.raises(onednn.OnednnUnavailable, match="no C.. compiler 'no-such-compiler-here'.*set CXX"):
    onednn.build(force=True)


@pytest.fixture
def fake_compiler(tmp_path, monkeypatch):
  """`build()` with a stand-in compiler (it writes a file where -o says) and a stand-in oneDNN prefix, into a private
  cache folder: no oneDNN or g++ needed, and the real cache is left alone."""
  compiler = tmp_path / 'fake-cxx'
  compiler.write_text('#!/bin/sh\nwhile [ "$1" != -o ]; do shift; done\necho built > "$2"\n')
  compiler.chmod(0o755)
  monkeypatch.setenv('CXX', str(compiler))
  monkeypatch.setattr(onednn, '_find_onednn', lambda: tmp_path / 'onednn')
  monkeypatch.setattr(onednn, '_cache_dir', lambda: tmp_path / 'cache')
  (tmp_path / 'cache').mkdir()
  return tmp_path / 'cache'


def building_lines(caplog):
  return [r.getMessage() for r in caplog.records if 'building the oneDNN' in r.getMessage()]


def test_a_build_says_so_in_one_line_and_a_cached_library_says_nothing(fake_compiler, caplog):
  with caplog.at_level('WARNING'):
    library = onednn.build()
  assert library.parent == fake_compiler and library.read_text() == 'built\n'
  assert building_lines(caplog) == [
      f'dem_jax: building the oneDNN convolution library (once, a few seconds) in {library}']
  caplog.clear()
  with caplog.at_level('WARNING'):
    assert onednn.build() == library  # cached: loaded as it is, without a word
  assert caplog.records == []
  library.write_text('changed')
  with caplog.at_level('WARNING'):
    onednn.build()
  (line,) = building_lines(caplog)
  assert line.endswith(f'(the cached one is not loaded: {library} does not match the sha256 recorded in '
                       f'{onednn.digest_path(library).name} when it was built)')


def test_float32_or_bfloat16_only_with_the_fix_in_the_message():
  with pytest.raises(ValueError, match="float32 or bfloat16.*conv_impl='xla'"):
    onednn.conv2d_onednn(jnp.zeros((1, 4, 4, 1), jnp.float16), jnp.zeros((3, 3, 1, 2), jnp.float16))
  with pytest.raises(ValueError, match='float32 kernel'):
    onednn.conv2d_onednn(jnp.zeros((1, 4, 4, 1), jnp.float32), jnp.zeros((3, 3, 1, 2), jnp.bfloat16))


def test_bfloat16_needs_native_kernels_and_says_so(monkeypatch):
  monkeypatch.setattr(onednn, '_state', dict(onednn._state, bf16='no AVX512-BF16 here'))
  assert not onednn.bf16_available()
  with pytest.raises(onednn.OnednnUnavailable, match='no AVX512-BF16 here.*model.dtype=float32'):
    onednn.conv2d_onednn(jnp.zeros((1, 4, 4, 1), jnp.bfloat16), jnp.zeros((3, 3, 1, 2)))


def test_library_without_the_bfloat16_query_has_float32_only(monkeypatch):
  monkeypatch.setattr(onednn, '_state', {'lib': object()})  # an older build: its handlers, no query
  assert onednn.available()
  assert onednn.bf16_unavailable_reason() == f'the oneDNN convolution library lacks {onednn.BF16_QUERY}'


def test_runs_on_every_device_under_pmap():
  """Four CPU devices call the handlers concurrently; each gets its own shard's convolution."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 2, 6, 5, 3)).astype(np.float32)
  k = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
  conv = lambda f: jax.pmap(lambda x: f(x, k, (1, 1), ((1, 1), (1, 1))))(x)
  np.testing.assert_allclose(conv(onednn.conv2d_onednn), conv(conv_ops.conv2d_xla), rtol=1e-5, atol=1e-5)


def test_unwritable_cache_folder_means_unavailable_not_a_crash(monkeypatch):
  def no_folder():
    raise PermissionError('read-only file system')
  monkeypatch.setattr(onednn, '_state', {})
  monkeypatch.setattr(onednn, '_cache_dir', no_folder)
  assert not onednn.available()
  assert 'cannot build onednn_conv.cc: read-only file system' in onednn.unavailable_reason()


@pytest.fixture
def small_source(tmp_path, monkeypatch):
  """`build()` compiles a one-function source into a private cache folder (quick, and leaves the real one alone)."""
  source = tmp_path / 'onednn_conv.cc'
  source.write_text('extern "C" int DemAnswer() { return 42; }\n')
  monkeypatch.setattr(onednn, 'SOURCE', source)
  monkeypatch.setattr(onednn, '_cache_dir', lambda: tmp_path / 'cache')
  (tmp_path / 'cache').mkdir()
  monkeypatch.setattr(onednn, '_state', {})
  monkeypatch.delenv(onednn.DISABLE_ENV, raising=False)
  return tmp_path / 'cache'


needs_onednn = pytest.mark.skipif(not onednn.available(), reason=onednn.unavailable_reason() or '')


@needs_onednn
def test_im2col_kernel_gradients_of_cpus_without_avx512_run_in_a_training_step():
  """Below AVX-512 (capped here by ONEDNN_MAX_CPU_ISA), oneDNN computes the kernel gradient of 3x3 layers over maps
  of a position or two by im2col and GEMM, in a scratchpad; with oneDNN's own global scratchpad the im2col wrote
  through a null buffer when XLA's threads called it, and the process died (SIGSEGV) in the first training step."""
  cmd = [sys.executable, '-m', 'dem_jax', 'bench', 'train_step', '--batch=2', '--frames=32', '--mels=16',
         '--width=0.125', '--steps=1', '--rounds=1', '--reference=none']
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='1', ONEDNN_MAX_CPU_ISA='AVX2', ONEDNN_VERBOSE='1')
  result = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.strip().splitlines()[-1])['triplets_per_s'] > 0
  if 'gemm:jit,backward_weights' not in result.stdout:
    pytest.skip('this oneDNN ran no im2col kernel gradient in the step, so the case was not covered')


@needs_onednn
def test_build_records_the_digest_and_removes_other_builds(small_source):
  stale = small_source / f'{onednn.LIBRARY_PREFIX}0123456789abcdef.so'
  stale.write_bytes(b'old')
  onednn.digest_path(stale).write_text('x')
  library = onednn.build()
  assert onednn.digest_path(library).read_text().split()[0] == hashlib.sha256(library.read_bytes()).hexdigest()
  assert onednn.untrusted_reason(library) is None
  assert sorted(p.name for p in small_source.iterdir()) == [library.name, library.name + '.sha256']


@needs_onednn
def test_changed_missing_digest_or_writable_library_is_rebuilt_before_loading(small_source):
  library = onednn.build()
  good = library.read_bytes()
  with library.open('ab') as f:
    f.write(b'\0')
  assert 'does not match the sha256' in onednn.untrusted_reason(library)
  assert onednn.build().read_bytes() == good

  library.chmod(0o777)
  assert 'writable by its group or by others' in onednn.untrusted_reason(library)
  assert not stat.S_IMODE(onednn.build().stat().st_mode) & 0o022

  onednn.digest_path(library).unlink()
  assert 'sha256 does not exist' in onednn.untrusted_reason(library)
  onednn.build()
  assert onednn.untrusted_reason(library) is None


@needs_onednn
@pytest.mark.skipif(os.geteuid() != 0, reason='giving a file to another user takes root')
def test_library_owned_by_another_user_is_not_trusted(small_source):
  library = onednn.build()
  os.chown(library, 4242, -1)
  assert 'owned by user id 4242' in onednn.untrusted_reason(library)
  onednn.build()
  assert library.stat().st_uid == os.getuid()


@needs_onednn
def test_library_missing_a_handler_makes_the_path_unavailable_instead_of_raising(small_source):
  assert not onednn.available()
  assert 'lacks DemOnednnConvForward, DemOnednnConvBackwardData' in onednn.unavailable_reason()
  assert 'delete it to have it rebuilt' in onednn.unavailable_reason()


@needs_onednn
def test_a_cache_folder_others_can_write_to_is_not_trusted_unless_sticky(small_source):
  library = onednn.build()
  small_source.chmod(0o777)
  assert 'its folder' in onednn.untrusted_reason(library) and 'chmod go-w' in onednn.untrusted_reason(library)
  assert not onednn.available() and 'its folder' in onednn.unavailable_reason()
  small_source.chmod(0o1777)  # sticky, as /tmp: no one can replace another user's file there
  assert onednn.untrusted_reason(library) is None


@needs_onednn
def test_the_library_is_loaded_through_the_file_descriptor_it_was_checked_by(small_source, monkeypatch):
  loaded = []
  real_cdll = onednn.ctypes.CDLL
  monkeypatch.setattr(onednn.ctypes, 'CDLL', lambda path: loaded.append(path) or real_cdll(path))
  assert not onednn.available()  # the small library lacks the handlers, but it was loaded
  (path,) = loaded
  assert path.startswith('/proc/self/fd/')
  symlink = small_source / 'link.so'
  symlink.symlink_to(onednn.build())
  onednn.digest_path(symlink).write_text(onednn.digest_path(onednn.build()).read_text())
  assert 'a symbolic link is not followed' in onednn.untrusted_reason(symlink)
