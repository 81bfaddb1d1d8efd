r"""Triplet training on DCASE 2018 task 5 (SINS) features.

  dem-jax train --config=dcase --workdir=/scratch/dcase_run \
      --config.features_dir=/data/features/dcase_dev
  dem-jax train --config=dcase:tiny --workdir=/tmp/dcase_tiny --config.features_dir=...   # CPU, a smoke run
  dem-jax train --config=dcase:cpu --workdir=/tmp/dcase_cpu --config.features_dir=...     # CPU, 15-min budget

The embedding trains on fold 1's train part and holds fold 1's evaluate clips out for the held-out loss and
silhouette (labels are never used in training); --config.data.fold=0 trains on all four folds.
"""

from dem_jax.configs import base


def get_config(arg=None):
  config = base.get_config()
  config.data.cross_clip_neighbours = True  # Consecutive 10-s segments of a session are continuous.
  config.data.distant_other_group = True  # The 4 nodes of a session hear the same moment.
  if arg == 'tiny':
    base.shrink_for_cpu(config)
  elif arg == 'cpu':
    base.cpu_recipe(config)
  elif arg:
    raise ValueError(f'Unknown config argument {arg!r}; use dcase, dcase:tiny or dcase:cpu (or configs/dcase.py:tiny '
                     'and so on in a checkout).')
  return config
