"""The benchmarks' contracts that do not depend on speed: what they print and when they decline to run."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_on_a_cpu_only_machine_says_so_and_exits_zero():
  result = subprocess.run([sys.executable, '-m', 'dem_jax.bench', 'gpu'], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert 'no GPU' in lines[0] and '--allow_cpu' in lines[0]
  assert json.loads(lines[-1]) == {'benchmark': 'gpu', 'skipped': 'no GPU', 'backend': 'cpu'}


def test_every_benchmark_module_imports():
  """A benchmark is run by hand, rarely: a stale import must show here, not when someone measures."""
  import importlib  # pylint: disable=import-outside-toplevel
  import pkgutil  # pylint: disable=import-outside-toplevel
  from dem_jax import benchmarks  # pylint: disable=import-outside-toplevel
  helpers = {'harness', 'quality_data', 'torch_reference'}  # torch_reference runs under PyTorch's interpreter
  names = {m.name for m in pkgutil.iter_modules(benchmarks.__path__)} - helpers
  assert {'embed_folder', 'train_step', 'quality', 'preprocess'} <= names
  for name in sorted(names):
    assert callable(importlib.import_module(f'dem_jax.benchmarks.{name}').main), name
