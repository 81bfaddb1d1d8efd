r"""Triplet training on music sorted by genre (folder data, one song per file).

  dem-jax train --config=music --workdir=/scratch/music_run \
      --config.features_dir=/data/features/music
  dem-jax train --config=music:tiny --workdir=/tmp/music_tiny --config.features_dir=...
  dem-jax train --config=music:cpu --workdir=/tmp/music_cpu --config.features_dir=...   # 15-min budget
"""

from dem_jax.configs import base


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
    raise ValueError(f'Unknown config argument {arg!r}; use music, music:tiny or music:cpu (or configs/music.py:tiny '
                     'and so on in a checkout).')
  return config
