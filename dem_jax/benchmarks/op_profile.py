"""Where a compiled call spends its time: milliseconds per call by kind of operation, from a JAX profiler trace.

XLA:CPU records every operation of the compiled program it runs (a fusion, a copy, a custom call such as a oneDNN
convolution) as a trace event named after its HLO instruction. `op_times` traces a few calls, reads the trace back
and sums the events by kind: each custom call by its target (named below for dem_jax's own), every other
instruction by its HLO opcode. Used by `bench train_step --profile_steps=N` and `bench embed --profile_steps=N`.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Callable

import jax

KIND_NAMES = {
    'DemOnednnConvForward': 'conv forward (oneDNN)',
    'DemOnednnConvBackwardData': 'conv input gradient (oneDNN)',
    'DemOnednnConvBackwardWeights': 'conv kernel gradient (oneDNN)',
    'DemOnednnConvBias': 'conv + BatchNorm [+ ReLU], inference (oneDNN)',
    'DemOnednnConvBiasAdd': 'conv + BatchNorm + residual + ReLU, inference (oneDNN)',
    'DemMaxPoolForward': 'max-pool forward',
    'DemMaxPoolBackward': 'max-pool gradient',
    'DemChannelSums': 'BatchNorm channel sums',
    'DemMaskedChannelSums': 'BatchNorm channel sums',
}
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def instruction_kinds(hlo_text: str) -> dict[str, str]:
  """{instruction name: kind} for the instructions a compiled program runs as its own operations.

  Those of the entry computation and of the computations it runs as loops, branches or calls; not the
  instructions inside fusions, which run as part of their fusion.
  """
  blocks, name, lines = {}, None, []
  for line in hlo_text.splitlines():
    header = re.match(r'^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$', line)
    if header and not line.startswith(' '):
      name, lines = ('ENTRY' if header.group(1) else header.group(2)), []
      blocks[name] = lines
    elif name is not None:
      lines.append(line)
  if 'ENTRY' not in blocks:
    raise ValueError('no ENTRY computation in the HLO text: pass the text of a compiled program '
                     '(jitted.lower(...).compile().as_text())')
  kinds, pending, seen = {}, ['ENTRY'], set()
  while pending:
    block = pending.pop()
    if block in seen or block not in blocks:
      continue
    seen.add(block)
    for line in blocks[block]:
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      instruction, opcode = m.groups()
      if opcode == 'custom-call':
        target = _TARGET.search(line)
        kinds[instruction] = KIND_NAMES.get(target.group(1), target.group(1)) if target else 'custom-call'
      else:
        kinds[instruction] = f'XLA {opcode}'
      # Loops, branches and calls run their computations' instructions as operations of their own.
      pending += re.findall(r'(?:body|condition|true_computation|false_computation)=%?([\w.\-]+)', line)
      if opcode == 'call':
        pending += re.findall(r'to_apply=%?([\w.\-]+)', line)
      for group in re.findall(r'branch_computations=\{([^}]*)\}', line):
        pending += [b.strip().lstrip('%') for b in group.split(',')]
  return kinds


def op_times(call: Callable[[], object], hlo_text: str, calls: int = 5) -> dict:
  """Traces `calls` calls of `call` (already compiled and warm) and returns, per call:

  {'wall_ms': the calls' wall time, 'ops_ms': the operations' summed time, 'by_kind': {kind: ms}, largest first,
   'top': [[instruction, kind, ms], ...], the 10 largest operations}.

  Raises RuntimeError when the trace holds no event of the program's operations (a backend or jaxlib that does not
  record them).
  """
  kinds = instruction_kinds(hlo_text)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.block_until_ready(call())
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      start = time.perf_counter()
      for _ in range(calls):
        out = call()
      jax.block_until_ready(out)
      wall = time.perf_counter() - start
    found = glob.glob(os.path.join(trace_dir, '**', '*.json.gz'), recursive=True)
    if not found:
      raise RuntimeError(f'jax.profiler.trace wrote no perfetto trace into {trace_dir}')
    with gzip.open(found[0]) as f:
      trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  per_instruction = collections.Counter()
  for event in events:
    if event.get('ph') == 'X' and event.get('name') in kinds:
      per_instruction[event['name']] += event.get('dur', 0) / 1000.0 / calls
  if not per_instruction:
    raise RuntimeError('the profiler trace holds no event of the compiled program\'s operations '
                       f'({jax.default_backend()} backend, jax {jax.__version__}); --profile_steps needs XLA:CPU\'s '
                       'per-operation trace events')
  by_kind = collections.Counter()
  for instruction, ms in per_instruction.items():
    by_kind[kinds[instruction]] += ms
  return {'wall_ms': wall * 1000.0 / calls, 'ops_ms': sum(by_kind.values()),
          'by_kind': {kind: round(ms, 3) for kind, ms in by_kind.most_common()},
          'top': [[name, kinds[name], round(ms, 3)] for name, ms in per_instruction.most_common(10)]}


def format_table(profile: dict) -> str:
  """The profile as lines of text: each kind's ms per call and share of the operations' time."""
  ops = profile['ops_ms']
  lines = [f'time per call by kind of operation: {profile["wall_ms"]:.1f} ms wall, {ops:.1f} ms in operations']
  for kind, ms in profile['by_kind'].items():
    lines.append(f'  {ms:9.2f} ms  {100 * ms / ops:5.1f}%  {kind}')
  return '\n'.join(lines)
