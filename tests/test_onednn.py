"""The oneDNN convolution library: it is built and loaded where it should be, and says why where it cannot be."""

import os
import platform
import sys

os.environ.setdefault('JAX_NUM_CPU_DEVICES', '4')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dem_jax import cpu_ops  # noqa: E402
from dem_jax import onednn  # noqa: E402


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
    assert cpu_ops._onednn_available.__wrapped__() is False
  assert 'no compiler here' in caplog.text and "XLA's convolutions" in caplog.text
  with pytest.raises(onednn.OnednnUnavailable, match='no compiler here'):
    onednn.conv2d_onednn(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 2)))


def test_missing_compiler_is_named(monkeypatch):
  monkeypatch.setenv('CXX', 'no-such-compiler-here')
  with pytest.raises(onednn.OnednnUnavailable, match="no C.. compiler 'no-such-compiler-here'.*set CXX"):
    onednn.build(force=True)


def test_float32_only_with_the_fix_in_the_message():
  with pytest.raises(ValueError, match="float32 only.*conv_impl='xla'"):
    onednn.conv2d_onednn(jnp.zeros((1, 4, 4, 1), jnp.bfloat16), jnp.zeros((3, 3, 1, 2), jnp.bfloat16))


def test_runs_on_every_device_under_pmap():
  """Four CPU devices call the handlers concurrently; each gets its own shard's convolution."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 2, 6, 5, 3)).astype(np.float32)
  k = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
  conv = lambda f: jax.pmap(lambda x: f(x, k, (1, 1), ((1, 1), (1, 1))))(x)
  np.testing.assert_allclose(conv(onednn.conv2d_onednn), conv(cpu_ops.conv2d_xla), rtol=1e-5, atol=1e-5)


def test_unwritable_cache_folder_means_unavailable_not_a_crash(monkeypatch):
  def no_folder():
    raise PermissionError('read-only file system')
  monkeypatch.setattr(onednn, '_state', {})
  monkeypatch.setattr(onednn, '_cache_dir', no_folder)
  assert not onednn.available()
  assert 'cannot build onednn_conv.cc: read-only file system' in onednn.unavailable_reason()
