"""The one front door: `dem-jax CMD [FLAGS]`, `python -m dem_jax CMD [FLAGS]` and `./launch.sh CMD [FLAGS]`.

The command table is the folder dem_jax/commands/: each module there is one command, with its flags and `main`.
Commands that run XLA on the CPU are started in a process whose malloc keeps freed memory (`dem_jax.process`): the
setting only takes effect when it is in the environment before the process starts, so the dispatcher starts itself
again with it once.
"""

from __future__ import annotations

import ast
import errno
import importlib
import importlib.util
import os
import pkgutil
import re
import sys
from concurrent.futures.process import BrokenProcessPool

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
    elif out and out[-1] == '--config':  # the value as the next argument
      arg = configs.resolve(arg)
    out.append(arg)
  return out


# What to do about an operating-system error, by errno; the work already saved is kept by every command (preprocess's
# finished blocks, train's checkpoints, embed's written files), so the same command goes on from there.
_OS_ERROR_FIXES = {
    errno.ENOSPC: 'free space there (or choose another output folder)',
    errno.EDQUOT: 'free space within your quota there (or choose another output folder)',
    errno.EACCES: 'fix its permissions or choose another path',
    errno.EPERM: 'fix its permissions or choose another path',
    errno.EROFS: 'that file system is read-only; choose another path',
    errno.ENOENT: 'check the path',
    errno.ELOOP: 'a symbolic link there points back at itself; fix or remove it',
    errno.ENAMETOOLONG: 'choose a shorter path',
    errno.EMFILE: 'raise the open-file limit (ulimit -n)',
    errno.EIO: 'the disk or network file system failed to read or write; check it',
}


def os_error_line(e: OSError) -> str:
  """One line for an operating-system error: what failed, on which path, and the fix."""
  what = e.strerror or str(e)
  where = f' ({e.filename})' if e.filename else ''
  fix = _OS_ERROR_FIXES.get(e.errno, 'fix the cause')
  return f'{what}{where}; {fix}, then run the same command again: what was saved so far is kept.'


def _disk_full(e: Exception) -> bool:
  """tensorstore reports a full disk as a ValueError whose text carries the OS's words (its RESOURCE_EXHAUSTED
  alone also means a remote store's quota)."""
  text = str(e)
  return "os_error_code='28'" in text or 'No space left on device' in text


def fail(name: str, message: str, code: int = 1):
  print(f'{name}: {message}', file=sys.stderr)
  sys.exit(code)


def _one_line(e: BaseException) -> str:
  while len(e.args) == 1 and isinstance(e.args[0], BaseException):  # ml_collections wraps its KeyError
    e = e.args[0]
  text = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)  # KeyError's str is a repr
  return ' '.join(text.split())


def _flags_parser(name: str):
  """absl's parser with the errors of a --config.X override (a field that does not exist, ml_collections' KeyError
  or AttributeError with its "Did you mean") turned into one line."""
  from absl import flags

  def parse(argv):
    try:
      rest = flags.FLAGS(argv)
    except flags.Error as e:
      # A config file's own error arrives as a traceback inside the message: its last line says what is wrong.
      lines = [line for line in str(e).splitlines() if line.strip() and line.strip() != '.']
      detail = lines[0] if len(lines) < 3 else f'{lines[0].split(":")[0]}: {lines[-1]}'
      fail(name, f'{detail.rstrip(".")}. See dem-jax {name} --help.')
    except (KeyError, AttributeError) as e:
      fields = {f for a in argv if a.startswith('--config.') for f in a.split('=')[0].split('.')[1:]}
      if not any(f"'{f}'" in _one_line(e) for f in fields):
        raise  # not an override's: an error inside the config file, with its traceback
      fail(name, f'a --config override names no field of the config ({_one_line(e)}); check the name against the '
           'config file.')
    except SyntaxError as e:
      fail(name, f'--config: {e.filename} line {e.lineno}: {e.msg}; fix the config file.')
    if 'config' in flags.FLAGS and flags.FLAGS['config'].present:
      try:
        getattr(flags.FLAGS.config, 'keys')  # A config file that failed to load raises on first use: say so now.
      except Exception as e:  # pylint: disable=broad-except
        from dem_jax import configs
        text = _one_line(e)
        reason = text[text.index('[Errno'):] if '[Errno' in text else text
        fail(name, f'--config could not be loaded ({reason[:300]}); give a config file\'s path or a short name '
             f'({", ".join(configs.NAMES)}, with :tiny or :cpu where the config has them).')
    return rest
  return parse


def run(name: str, args: list[str]) -> None:
  """Runs command `name` in this process: absl parses `args` against the command module's flags.

  The last handler of every command: an operating-system error, a full disk, a dead worker process or Ctrl-C ends
  the command in one line with the fix and the exit code docs/reliability.md lists, never a traceback.
  """
  try:
    module = importlib.import_module(f'dem_jax.commands.{name}')
    if getattr(module, 'PARSES_ITS_OWN_ARGUMENTS', False):  # bench: each benchmark has its own flags
      module.main(args)
      return
    flag_args = args[:args.index('--')] if '--' in args else args
    if any(a in HELP_FLAGS for a in flag_args):
      print(help_text(name, module), flush=True)  # flushed here, so that a closed pipe is met in this `try`
      return
    from absl import app
    app.run(module.main, argv=[f'dem-jax {name}', *resolve_config_arguments(args)], flags_parser=_flags_parser(name))
  except BrokenProcessPool:
    fail(name, 'a worker process died (killed, or out of memory: see `dmesg`); run the same command again: what '
         'was saved so far is kept.')
  except BrokenPipeError:  # `dem-jax CMD --help | head`: the reader went away, nothing failed
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)
  except KeyboardInterrupt:
    fail(name, 'interrupted; run the same command again to go on: what was saved so far is kept.', 130)
  except OSError as e:
    fail(name, os_error_line(e))
  except ValueError as e:
    if not _disk_full(e):
      raise
    path = re.search(r'(?:local file|file) "([^"]+)"', str(e))
    fail(name, os_error_line(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path and path.group(1))))


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
    # -P: the folder the user is in (a stray jax.py, another dem_jax/) must not shadow the installed packages.
    os.execve(sys.executable, [sys.executable, '-P', '-m', 'dem_jax', name, *args], env)
  run(name, args)
