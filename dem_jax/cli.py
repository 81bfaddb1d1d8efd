"""The one front door: `dem-jax CMD [FLAGS]`, `python -m dem_jax CMD [FLAGS]` and `./launch.sh CMD [FLAGS]`.

The command table is the folder dem_jax/commands/: each module there is one command, with its flags and `main`.
Commands that run XLA on the CPU are started in a process whose malloc keeps freed memory (`dem_jax.process`): the
setting only takes effect when it is in the environment before the process starts, so the dispatcher starts itself
again with it once.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import pkgutil
import sys

from dem_jax import commands
from dem_jax import process

HELP_FLAGS = ('-h', '--help', '--helpshort', '--helpfull', '-?')


def command_names() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith('_'))


def summary(name: str) -> str:
  """The first line of the command module's docstring, read without importing it (some import JAX)."""
  spec = importlib.util.find_spec(f'dem_jax.commands.{name}')
  with open(spec.origin, encoding='utf-8') as f:
    doc = ast.get_docstring(ast.parse(f.read())) or ''
  return doc.split(':')[0].split('\n')[0].strip().rstrip('.')


def usage() -> str:
  lines = ['usage: dem-jax COMMAND [FLAGS]   (in a checkout, ./launch.sh COMMAND is the same command)', '']
  lines += [f'  {name:<12} {summary(name)}' for name in command_names()]
  lines += ['', "A command's flags: dem-jax COMMAND --help"]
  return '\n'.join(lines)


def help_text(name: str, module) -> str:
  """The command's docstring and its flags (absl's --help exits 1 and lists only the starting module's)."""
  from absl import flags
  text = [f'dem-jax {name}: {(module.__doc__ or "").strip()}', '']
  flag_help = flags.FLAGS.module_help(module)
  if flag_help:
    text += ['Flags:', flag_help]
  return '\n'.join(text)


def resolve_config_arguments(args: list[str]) -> list[str]:
  """`--config=dcase:tiny` (a config's short name, usable wherever dem_jax is installed) -> the packaged file."""
  from dem_jax import configs
  out = []
  for arg in args:
    if arg.startswith('--config='):
      arg = '--config=' + configs.resolve(arg[len('--config='):])
    out.append(arg)
  return out


def run(name: str, args: list[str]) -> None:
  """Runs command `name` in this process: absl parses `args` against the command module's flags."""
  module = importlib.import_module(f'dem_jax.commands.{name}')
  if getattr(module, 'PARSES_ITS_OWN_ARGUMENTS', False):  # bench: each benchmark has its own flags
    module.main(args)
    return
  flag_args = args[:args.index('--')] if '--' in args else args
  if any(a in HELP_FLAGS for a in flag_args):
    print(help_text(name, module))
    return
  from absl import app
  app.run(module.main, argv=[f'dem-jax {name}', *resolve_config_arguments(args)])


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ('help', *HELP_FLAGS):
    print(usage())
    return
  name, args = argv[0], argv[1:]
  if name not in command_names():
    print(f"dem-jax: unknown command '{name}'.\n{usage()}", file=sys.stderr)
    sys.exit(2)
  env = process.cpu_malloc_environment(name, args, os.environ)
  if env != os.environ:
    os.execve(sys.executable, [sys.executable, '-m', 'dem_jax', name, *args], env)
  run(name, args)
