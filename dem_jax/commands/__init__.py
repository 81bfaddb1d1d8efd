"""The command lines of the library modules: each defines its absl flags at module level and a small `main`.

They live apart from the library modules (dem_jax.embed, dem_jax.evaluate) so that importing a library module
defines no flags, and any main here can be imported (e.g. `from dem_jax.commands.embed import main`). `python -m
dem_jax.embed` and `python -m dem_jax.evaluate` run them.
"""


def run(command) -> None:
  """Runs `command.main` under absl, with the command's flags listed by `--help`: absl lists those of the module
  the process was started as (sys.argv[0], here the library module, which defines none)."""
  import sys
  from absl import app
  from absl import flags
  for flag in flags.FLAGS.get_key_flags_for_module(command):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(command.main)
