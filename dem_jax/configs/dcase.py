"""configs/dcase.py under the dem_jax name; loads by import and by path (`--config=.../dem_jax/configs/dcase.py`)."""

from configs.dcase import *  # noqa: F401,F403
from configs.dcase import get_config  # noqa: F401
