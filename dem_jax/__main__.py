"""`python -m dem_jax CMD [FLAGS]`: the `dem-jax` command (dem_jax.cli)."""

from dem_jax import cli

cli.main()
