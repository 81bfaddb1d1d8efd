r"""Triplet training on music sorted by genre (folder data, one song per file).

  ./launch.sh train --config=configs/music.py --workdir=/scratch/music_run \
      --config.features_dir=/data/features/music
  ./launch.sh train --config=configs/music.py:tiny --workdir=/tmp/music_tiny --config.features_dir=...
  ./launch.sh train --config=configs/music.py:cpu --workdir=/tmp/music_cpu --config.features_dir=...   # 15 min
"""

from configs import base


def get_config(arg=None):
  config = base.get_config()
  config.data.cross_clip_neighbours = False  # Each song is its own file.
  config.data.distant_other_group = True  # Another song (or, with a group column, another album/artist).
  config.model.embedding_dim = 256
  if arg == 'tiny':
    base.shrink_for_cpu(config)
  elif arg == 'cpu':
    base.cpu_recipe(config)
  elif arg:
    raise ValueError(f'Unknown config argument {arg!r}; use configs/music.py, configs/music.py:tiny or '
                     'configs/music.py:cpu.')
  return config
