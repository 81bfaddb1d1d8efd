"""The `dem-jax` command: the subcommands of ./launch.sh, for dem_jax installed as a library.

    dem-jax preprocess --dataset=dcase2018_task5 --data_dir=IN --output_dir=OUT
    dem-jax train --config=configs/dcase.py --workdir=W --config.features_dir=OUT
    dem-jax evaluate --workdir=W
    dem-jax embed --workdir=W --input=FILE_OR_DIR --output_dir=O

Each subcommand runs its module's own command line (`python -m <module>`) in place of this process, after setting
the CPU malloc settings that ./launch.sh sets (see `cpu_malloc_environment`): they only take effect when set before
the process starts.
"""

from __future__ import annotations

import importlib.util
import os
import sys

COMMANDS = {
    'train': 'dem_jax.train',
    'evaluate': 'dem_jax.evaluate',
    'embed': 'dem_jax.embed',
    'preprocess': 'dem_jax.preprocess',
    'sample_data': 'preprocess.sample_data',
    'demo': 'dem_jax.demo',
    'bench': 'dem_jax.bench',
}
# The commands whose process runs XLA on the host (`bench preprocess` does not; see `cpu_malloc_environment`).
XLA_COMMANDS = ('train', 'evaluate', 'embed', 'demo', 'bench')


def usage() -> str:
  return ('usage: dem-jax {' + '|'.join(COMMANDS) + '} [FLAGS]\n'
          "Each subcommand's flags: dem-jax <subcommand> --help. The checkout's ./launch.sh help shows examples.")


def has_gpu_jax() -> bool:
  """Whether jax's CUDA plugin is installed (jax[cuda12]); its processes allocate on the device."""
  return importlib.util.find_spec('jax_cuda12_plugin') is not None


def cpu_malloc_environment(command: str, args: list[str], environ: dict[str, str], *, gpu: bool) -> dict[str, str]:
  """`environ` with glibc's malloc set to one arena that keeps freed memory, for XLA on the CPU.

  XLA:CPU re-allocates its large step buffers every step, and fresh pages cost a page fault per 4 KiB
  (dem_jax.process.retain_freed_memory says more). Values already set are kept; GPU installs are left alone.
  """
  env = dict(environ)
  if gpu or command not in XLA_COMMANDS or (command == 'bench' and args[:1] == ['preprocess']):
    return env
  env.setdefault('MALLOC_ARENA_MAX', '1')
  env.setdefault('MALLOC_MMAP_MAX_', '0')
  env.setdefault('MALLOC_TRIM_THRESHOLD_', '8589934592')
  return env


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ('help', '-h', '--help'):
    print(usage())
    return
  command, args = argv[0], argv[1:]
  if command not in COMMANDS:
    sys.exit(f"dem-jax: unknown command '{command}'.\n{usage()}")
  env = cpu_malloc_environment(command, args, os.environ, gpu=has_gpu_jax())
  os.execve(sys.executable, [sys.executable, '-m', COMMANDS[command], *args], env)


if __name__ == '__main__':
  main()
