"""Shared fixtures. Four fake CPU devices for every test, so multi-device code runs as on a 4-GPU node."""

import atexit
import json
import os
import shutil
import tempfile

os.environ.setdefault('JAX_NUM_CPU_DEVICES', '4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# One compilation cache for the session, shared with the processes the tests start (they inherit the environment):
# the many small training runs compile the same programs, and on two cores compiling is much of their time. A cached
# executable is the one XLA compiled, so results are unchanged. Set JAX_COMPILATION_CACHE_DIR to keep one across runs.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='dem_jax_tests_xla_cache_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
# The tests run a few steps of many small programs: LLVM's optimisation of each (XLA's default backend level) takes
# longer than running it. Level 0 compiles the same HLO to slower machine code; a quarter off the training tests.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()

import pytest  # noqa: E402

from dem_jax import process  # noqa: E402

# What the dispatcher gives the commands through the environment, for the tests' own process (before JAX starts).
process.retain_freed_memory_on_cpu()

from dem_jax.preprocess import sample_data  # noqa: E402

TEST_LABELS = ('absence', 'dishwashing', 'social_activity', 'vacuum_cleaner')


@pytest.fixture(scope='session')
def dcase_dir(tmp_path_factory):
  """A small DCASE 2018 task 5 development set: 4 activities x 4 sessions x 2 clips x 1 node = 32 clips."""
  root = tmp_path_factory.mktemp('dcase')
  sample_data.write_dcase2018_task5(str(root), labels=TEST_LABELS, sessions_per_label=4, clips_per_session=2,
                                    nodes=1, seed=1)
  return str(root)


@pytest.fixture(scope='session')
def music_dir(tmp_path_factory):
  """A small class-folder data set: 4 genres x 3 songs of 6 s (wav, flac, ogg; 22.05/44.1 kHz stereo)."""
  root = tmp_path_factory.mktemp('music')
  sample_data.write_folder(str(root), songs_per_genre=3, seconds=6.0, seed=2)
  return str(root)


@pytest.fixture(scope='session')
def dcase_features(dcase_dir, tmp_path_factory):
  """The small DCASE set preprocessed with the default front end (128 bands, 998 frames per clip)."""
  from dem_jax.configs import features as features_config
  from dem_jax.preprocess import job
  out = tmp_path_factory.mktemp('features') / 'dcase'
  job.run(features_config.get_config(), dataset='dcase2018_task5', data_dir=dcase_dir, output_dir=str(out))
  return str(out)


@pytest.fixture(scope='session')
def tiny_workdir(dcase_features, tmp_path_factory):
  """A model trained for a few steps on the small DCASE set (half-second tiles, tiny ResNet18)."""
  from dem_jax.configs import dcase as dcase_config
  from dem_jax import train
  config = dcase_config.get_config('tiny')
  config.features_dir = dcase_features
  config.data.tile_seconds = config.data.neighbour_seconds = 0.5
  config.batch_size = 8
  config.num_steps = 20
  workdir = tmp_path_factory.mktemp('train') / 'tiny'
  train.train_and_evaluate(config, str(workdir))
  return str(workdir)


@pytest.fixture
def store_with_value(tmp_path):
  """`copy(root, frame, band, value)`: a copy of the store at `root` with one stored value replaced, its file list
  updated as an older preprocessing job (one that did not refuse non-finite frames) would have written it."""
  import numpy as np
  import tensorstore as ts

  def copy(root, frame, band, value):
    out = str(tmp_path / f'store_{frame}_{band}')
    shutil.copytree(root, out)
    array = ts.open({'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': os.path.join(out, 'features.zarr')}},
                    read=True, write=True).result()
    array[frame, band].write(np.float16(value)).result()
    record_store_files(out)
    return out
  return copy


def record_store_files(root):
  """Rewrites the file list in root/features.json after a test changed the store's files, as if written so."""
  from dem_jax import features as features_lib
  info_path = os.path.join(root, 'features.json')
  with open(info_path) as f:
    info = json.load(f)
  info['store_files'] = features_lib.store_files(root)
  with open(info_path, 'w') as f:
    json.dump(info, f)
