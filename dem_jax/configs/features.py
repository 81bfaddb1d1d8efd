"""configs/features.py under the dem_jax name; loads by import and by path (`--config=.../dem_jax/configs/features.py`)."""

from configs.features import *  # noqa: F401,F403
from configs.features import get_config  # noqa: F401
