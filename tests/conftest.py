"""Shared fixtures. Four fake CPU devices for every test, so multi-device code runs as on a 4-GPU node."""

import os

os.environ.setdefault('JAX_NUM_CPU_DEVICES', '4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

from preprocess import sample_data  # noqa: E402

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
  from configs import features as features_config
  from preprocess import job
  out = tmp_path_factory.mktemp('features') / 'dcase'
  job.run(features_config.get_config(), dataset='dcase2018_task5', data_dir=dcase_dir, output_dir=str(out))
  return str(out)
