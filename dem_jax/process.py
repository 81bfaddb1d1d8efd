"""Process-wide settings for the jobs that run XLA on the CPU: how glibc's malloc keeps freed memory."""

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

# glibc's malloc settings for XLA on the CPU (`retain_freed_memory` says why), as the environment gives them to a
# process before it starts; the dispatcher (dem_jax.cli) starts every command that runs XLA on the CPU with them.
CPU_MALLOC_ENVIRONMENT = {'MALLOC_ARENA_MAX': '1', 'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': '8589934592'}
# The commands whose process runs no XLA on the host: the preprocessing job and its benchmark.
_NO_XLA_COMMANDS = (('preprocess',), ('sample_data',), ('bench', 'preprocess'))


def retain_freed_memory() -> bool:
  """Lets glibc's malloc keep freed memory for reuse instead of unmapping it; returns whether that applied.

  Why: XLA:CPU allocates every execution's temporary buffer (for a training step, a large one) with malloc, from
  its worker threads. Blocks that large are mmap'ed and unmapped per call, and the per-thread malloc arenas hand
  freed memory back too, so each step touches fresh pages and pays a page fault per 4 KiB of them. One arena, no
  mmap and a trim threshold far above a step's buffers (the next step is dispatched before the last one ends, so
  two steps' worth) remove them once the heap has grown to its peak (a few steps), and the step gets faster
  (docs/benchmarks.md has the figures).

  glibc fixes its arena limit when a second thread first allocates, so the arena setting made here reaches only
  threads created after it, if any thread allocated before; and mallopt takes the trim threshold as an int (2 GiB
  at most). The dispatcher therefore sets `CPU_MALLOC_ENVIRONMENT` before the process starts. Call this first in a
  main anyway (`retain_freed_memory_on_cpu` checks the backend), for processes started otherwise (a notebook,
  tests). Process-wide; the process keeps its peak host memory. A no-op where glibc is absent.
  """
  try:
    mallopt = ctypes.CDLL('libc.so.6').mallopt
  except (OSError, AttributeError):
    return False
  settings = {'MALLOC_ARENA_MAX': (-8, 1), 'MALLOC_MMAP_MAX_': (-4, 0), 'MALLOC_TRIM_THRESHOLD_': (-1, 2**31 - 1)}
  # What the environment set already (the dispatcher) stays: it reached every thread, and its trim threshold is larger.
  return all(bool(mallopt(*param_value)) for name, param_value in settings.items() if name not in os.environ)


def accelerator_plugin_installed() -> bool:
  """Whether JAX may run on something other than the CPU here, decided without starting a backend (or importing
  JAX, so that the dispatcher stays quick)."""
  if 'jax' in sys.modules:
    platforms = sys.modules['jax'].config.jax_platforms
  else:
    platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() != 'cpu'
  return (bool(importlib.metadata.entry_points(group='jax_plugins')) or
          any(importlib.util.find_spec(name) is not None for name in ('jax_plugins', 'libtpu')))


def retain_freed_memory_on_cpu() -> bool:
  """`retain_freed_memory` where JAX can only run on the CPU. Call it first in a main, before any JAX computation."""
  return not accelerator_plugin_installed() and retain_freed_memory()


def cpu_malloc_environment(command: str, args: list[str], environ) -> dict[str, str]:
  """`environ` with `CPU_MALLOC_ENVIRONMENT` added where command `command` runs XLA on the CPU only.

  Values already set are kept; an install with an accelerator plugin (jax[cuda12]) is left alone, its processes
  allocate on the device.
  """
  env = dict(environ)
  if (command,) in _NO_XLA_COMMANDS or (command, *args[:1]) in _NO_XLA_COMMANDS or accelerator_plugin_installed():
    return env
  return CPU_MALLOC_ENVIRONMENT | env
