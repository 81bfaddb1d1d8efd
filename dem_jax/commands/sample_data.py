"""Write a small synthetic data set in a real on-disk layout: `dem-jax sample_data --layout=dcase2018_task5 --out=D`.

The layouts are described in dem_jax.preprocess.sample_data. Exit status: 0 with the files written; 1 with one line
naming the problem otherwise.
"""

from absl import flags

from dem_jax.preprocess import sample_data

_LAYOUT = flags.DEFINE_enum('layout', 'dcase2018_task5', ['dcase2018_task5', 'folder'], 'Which on-disk layout.')
_OUT = flags.DEFINE_string('out', None, 'Output folder.', required=True)
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed.')
_SESSIONS = flags.DEFINE_integer('sessions_per_label', 4, 'dcase2018_task5: sessions per activity.')
_CLIPS = flags.DEFINE_integer('clips_per_session', 3, 'dcase2018_task5: consecutive 10-s clips per session.')
_NODES = flags.DEFINE_integer('nodes', 2, 'dcase2018_task5: recording nodes (the real set has 4).')
_SONGS = flags.DEFINE_integer('songs_per_genre', 6, 'folder: songs per genre.')


def main(argv):
  del argv
  if _LAYOUT.value == 'dcase2018_task5':
    names = sample_data.write_dcase2018_task5(_OUT.value, sessions_per_label=_SESSIONS.value,
                                              clips_per_session=_CLIPS.value, nodes=_NODES.value, seed=_SEED.value)
  else:
    names = sample_data.write_folder(_OUT.value, songs_per_genre=_SONGS.value, seed=_SEED.value)
  print(f'wrote {len(names)} files to {_OUT.value}')
