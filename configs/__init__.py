"""The training and feature configs: Python files with `get_config(arg=None)`, installed as `dem_jax.configs`.

A command names one by path (`--config=configs/dcase.py:tiny` in a checkout) or, wherever dem_jax is installed, by
its short name (`--config=dcase:tiny`); from Python, `from dem_jax.configs import dcase; dcase.get_config('tiny')`.
"""

import os

NAMES = ('base', 'dcase', 'features', 'music')


def path(name: str) -> str:
  """The file of config `name` (one of NAMES)."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), f'{name}.py')


def resolve(value: str) -> str:
  """A `--config` value with a short name (`dcase`, `dcase:tiny`) turned into the packaged file; paths unchanged."""
  name, colon, arg = value.partition(':')
  if name in NAMES and not os.path.isfile(name):  # a data folder called music/ is no config
    return path(name) + colon + arg
  return value
