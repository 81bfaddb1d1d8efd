"""The command lines of the library modules: each defines its absl flags at module level and a small `main`.

They live apart from the library modules (dem_jax.embed, dem_jax.evaluate) so that importing a library module
defines no flags, and any main here can be imported (e.g. `from dem_jax.commands.embed import main`). `python -m
dem_jax.embed` and `python -m dem_jax.evaluate` run them.
"""
