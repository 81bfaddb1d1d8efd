"""The command lines, one module each: its absl flags at module level and a small `main(argv)`.

The modules here are the command table of `dem-jax` (dem_jax.cli): a new module is a new command, and its
docstring's first line is the command's summary in `dem-jax help`. Library modules never import these.
"""
