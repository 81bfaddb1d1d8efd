"""What the train_step and embed benchmarks share: flags, interleaved timing, and the PyTorch reference process.

The machine these run on may be shared, so a single timing window can be slowed by someone else's work. Every
candidate (each JAX conv_impl, and PyTorch) is therefore timed in turn, round after round, and the report gives
the median and best window of each; the ratio to PyTorch uses medians of windows taken side by side.
"""

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Callable

import jax

from dem_jax.ops import conv as conv_ops
from dem_jax import models
from dem_jax.benchmarks import op_profile

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_TORCH_PYTHON = REPO_ROOT / '.venv-torch' / 'bin' / 'python'
TORCH_REFERENCE = pathlib.Path(__file__).resolve().with_name('torch_reference.py')


def parse_flags(argv: list[str], description: str, default_steps: int) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=f'dem-jax bench {description}', description=__doc__)
  p.add_argument('--batch', type=int, default=32, help='triplets (train_step) or tiles (embed) per step')
  p.add_argument('--frames', type=int, default=64, help='T: frames per tile')
  p.add_argument('--mels', type=int, default=128, help='M: mel bands')
  p.add_argument('--width', type=float, default=1.0, help='channel multiplier (1.0: 64-128-256-512)')
  p.add_argument('--model', default='resnet18', choices=('resnet18', 'resnet34'))
  p.add_argument('--steps', type=int, default=default_steps, help='steps per timing window')
  p.add_argument('--rounds', type=int, default=3, help='timing windows per candidate, interleaved')
  p.add_argument('--conv_impl', default='auto',
                 help="comma-separated conv_impl values to time, e.g. 'auto,onednn,im2col,xla'; the first is the "
                 'headline')
  # 'auto' by default, as config.model.dtype: the bench measures the dtype a training or embedding run computes in.
  p.add_argument('--dtype', default='auto', choices=models.DTYPES,
                 help="computation dtype of the JAX model; 'auto' (the default, as config.model.dtype): what "
                 'models.resolve_dtype picks here for this width and the first conv_impl; float32 to measure '
                 'float32. bfloat16 also runs the PyTorch reference with bfloat16 autocast and channels_last')
  p.add_argument('--parallel', default='jit', choices=('jit', 'pmap'), help='how the step is compiled')
  p.add_argument('--reference', default='torch', choices=('torch', 'none'))
  p.add_argument('--profile_steps', type=int, default=0,
                 help='> 0: also trace that many calls of the first conv_impl and print the time per call by kind '
                 'of operation (oneDNN convolutions, pooling, BatchNorm sums, XLA fusions; benchmarks/op_profile.py)')
  p.add_argument('--torch_python', default='',
                 help=f'interpreter with torch for the reference (default: {DEFAULT_TORCH_PYTHON} if present, '
                 'else this one if it has torch)')
  p.add_argument('--retain_memory', type=int, default=1,
                 help='1: keep freed host memory in the malloc heap (process.retain_freed_memory), in both the '
                 'JAX and the PyTorch process')
  flags = p.parse_args(argv)
  flags.conv_impls = [c for c in flags.conv_impl.split(',') if c]
  for c in flags.conv_impls:
    if c not in conv_ops.CONV_IMPLS:
      p.error(f'--conv_impl: {c!r} is not one of {conv_ops.CONV_IMPLS}')
  flags.dtype_flag = flags.dtype
  flags.dtype = models.resolve_dtype(flags.dtype, width=flags.width, conv_impl=flags.conv_impls[0]).name
  return flags


def find_torch_python(flag: str) -> tuple[str | None, str]:
  """(interpreter, why): the interpreter that will run the PyTorch reference, or None and the reason."""
  if flag:
    if not os.access(flag, os.X_OK):
      return None, f'no PyTorch reference: --torch_python={flag} is not an executable'
    return flag, '--torch_python'
  if DEFAULT_TORCH_PYTHON.exists():
    return str(DEFAULT_TORCH_PYTHON), 'default .venv-torch'
  if importlib.util.find_spec('torch') is not None:
    return sys.executable, 'torch importable here'
  return None, (f'no PyTorch reference: {DEFAULT_TORCH_PYTHON} does not exist and torch is not importable here; '
                'create it with `/path/to/python3.11 -m venv .venv-torch && .venv-torch/bin/pip install torch numpy` '
                'or pass --torch_python=/path/to/python-with-torch')


class TorchReference:
  """The PyTorch eager twin of the benchmark, kept warm in a subprocess and timed one window at a time."""

  def __init__(self, python: str, mode: str, flags: argparse.Namespace):
    cmd = [python, str(TORCH_REFERENCE), f'--mode={mode}', f'--model={flags.model}', f'--batch={flags.batch}',
           f'--frames={flags.frames}', f'--mels={flags.mels}', f'--width={flags.width}', f'--threads={os.cpu_count()}',
           f'--dtype={flags.dtype}', '--serve'] + (['--retain_memory'] if flags.retain_memory else [])
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.info = self._read()

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'the PyTorch reference exited (code {self.proc.wait()}); run it by hand to see why: '
                         f'{" ".join(self.proc.args[:-1])}')
    return json.loads(line)

  def seconds_per_step(self, steps: int) -> float:
    self.proc.stdin.write(f'{steps}\n')
    self.proc.stdin.flush()
    return self._read()['seconds_per_step']

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait(timeout=60)


def interleaved_windows(candidates: dict[str, Callable[[int], float]], steps: int, rounds: int,
                        pause_s: float = 0.2) -> dict[str, list[float]]:
  """Seconds per step of every candidate, `rounds` windows each, taken in turn (A B C A B C ...).

  The pause lets the previous candidate's worker threads go idle before the next one starts. Each candidate runs
  one untimed step at the start of its window: on a VM that reclaims idle memory, the first step after another
  process's window pays page faults for its own buffers again (docs/benchmarks.md has the figure).
  """
  windows = {name: [] for name in candidates}
  for _ in range(rounds):
    for name, run in candidates.items():
      time.sleep(pause_s)
      windows[name].append(run(steps))
  return windows


def summarise(windows: list[float], items_per_step: int) -> dict:
  return {'median': items_per_step / statistics.median(windows), 'best': items_per_step / min(windows),
          'seconds_per_step': [round(w, 4) for w in windows]}


def run_and_report(result: dict, candidates: dict[str, Callable[[int], float]], flags: argparse.Namespace, *,
                   mode: str, rate_key: str, time_key: str, unit: str,
                   profile: Callable[[int], dict] | None = None) -> None:
  """Times the JAX candidates beside the PyTorch reference (when found), fills `result` and prints it as JSON.

  `rate_key` names the throughput ('triplets_per_s'), `time_key` the per-call seconds, `unit` the printed unit.
  With --profile_steps=N, `profile(N)` (op_profile.op_times of the first candidate) runs after the timing windows;
  its table is printed and its figures go under 'profile_ms_per_call'.
  """
  reference = None
  if flags.reference == 'torch':
    python, why = find_torch_python(flags.torch_python)
    if python is None:
      print(why, flush=True)
      result['reference'] = why
    else:
      print(f'starting the PyTorch reference ({why}: {python}) ...', flush=True)
      reference = TorchReference(python, mode, flags)
      result['torch'] = dict(reference.info)
      candidates['torch_eager'] = reference.seconds_per_step
  try:
    windows = interleaved_windows(candidates, flags.steps, flags.rounds)
  finally:
    if reference is not None:
      reference.close()

  for name, w in windows.items():
    summary = summarise(w, flags.batch)
    print(f'{name:14s} {unit} median {summary["median"]:8.2f}  best {summary["best"]:8.2f}  '
          f'({time_key} {summary["seconds_per_step"]})', flush=True)
    entry = {rate_key: summary['median'], f'{rate_key}_best': summary['best'], time_key: summary['seconds_per_step']}
    if name == 'torch_eager':
      result['torch'].update(entry)
    else:
      result[name] = entry
  if flags.profile_steps > 0 and profile is not None:
    figures = profile(flags.profile_steps)
    print(op_profile.format_table(figures), flush=True)
    result['profile_ms_per_call'] = figures
  result[rate_key] = result[f'jax_{flags.conv_impls[0]}'][rate_key]
  if 'torch_eager' in windows:
    result['ratio_vs_torch'] = {c: result[f'jax_{c}'][rate_key] / result['torch'][rate_key] for c in flags.conv_impls}
  print(json.dumps(result))


def timed_candidate(one_call: Callable[[], object]) -> tuple[Callable[[int], float], float]:
  """(run(steps) -> seconds per call, seconds of the first call: compilation plus one call) for a jitted call."""
  t0 = time.perf_counter()
  jax.block_until_ready(one_call())
  compile_s = time.perf_counter() - t0
  for _ in range(3):  # the malloc heap grows to its peak over the first steps (process.retain_freed_memory)
    out = one_call()
  jax.block_until_ready(out)

  def run(steps: int) -> float:
    jax.block_until_ready(one_call())  # untimed: see interleaved_windows
    t = time.perf_counter()
    for _ in range(steps):
      out = one_call()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / steps

  return run, compile_s
