"""configs/base.py under the dem_jax name; loads by import and by path (`--config=.../dem_jax/configs/base.py`)."""

from configs.base import *  # noqa: F401,F403
from configs.base import get_config  # noqa: F401
