"""The project's Python configs under the dem_jax name, for code that installed dem_jax as a library.

    from dem_jax.configs import dcase
    config = dcase.get_config('tiny')

Each module here re-exports the module of the same name in the checkout's top-level configs/ folder (the command
lines' `--config=configs/dcase.py`), so both names give the same config.
"""
