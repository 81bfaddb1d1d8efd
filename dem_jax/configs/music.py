"""configs/music.py under the dem_jax name; loads by import and by path (`--config=.../dem_jax/configs/music.py`)."""

from configs.music import *  # noqa: F401,F403
from configs.music import get_config  # noqa: F401
