"""The benchmarks' contracts that do not depend on speed: what they print and when they decline to run."""

import json
import os
import subprocess
import sys

import pytest

from dem_jax.benchmarks import op_profile
from dem_jax.ops import onednn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_on_a_cpu_only_machine_says_so_and_exits_zero():
  result = subprocess.run([sys.executable, '-m', 'dem_jax', 'bench', 'gpu'], cwd=ROOT, capture_output=True, text=True,
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
  from dem_jax.commands import bench  # pylint: disable=import-outside-toplevel
  names = {m.name for m in pkgutil.iter_modules(benchmarks.__path__)} - {'torch_reference'}  # PyTorch's interpreter
  assert set(bench.BENCHMARKS) <= names
  for name in sorted(names):
    module = importlib.import_module(f'dem_jax.benchmarks.{name}')
    if name in bench.BENCHMARKS:  # what `dem-jax bench NAME` runs
      assert callable(module.main), name


@pytest.mark.parametrize('native_bf16', [True, False])
def test_train_step_bench_computes_in_the_dtype_training_resolves_unless_told_float32(monkeypatch, native_bf16):
  from dem_jax import models  # pylint: disable=import-outside-toplevel
  from dem_jax.benchmarks import harness  # pylint: disable=import-outside-toplevel
  from dem_jax.configs import base  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(onednn, 'bf16_available', lambda: native_bf16)
  model = base.get_config().model
  assert model.dtype == 'auto'
  for width, expected in ((1.0, 'bfloat16' if native_bf16 else 'float32'), (0.25, 'float32')):
    flags = harness.parse_flags([f'--width={width}'], 'train_step', default_steps=5)
    # As `train` resolves config.model.dtype for this width and conv_impl, on this (CPU) backend.
    assert flags.dtype == models.resolve_dtype(model.dtype, width=width, conv_impl=model.conv_impl).name
    assert (flags.dtype, flags.dtype_flag) == (expected, 'auto')
  flags = harness.parse_flags(['--dtype=float32'], 'train_step', default_steps=5)
  assert (flags.dtype, flags.dtype_flag) == ('float32', 'float32')


HLO = """HloModule jit_step, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused_computation (param_0: f32[4]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  ROOT %inner_add = f32[4]{0} add(f32[4]{0} %param_0, f32[4]{0} %param_0)
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %pool_in_loop = f32[4]{0} custom-call(%p), custom_call_target="DemMaxPoolForward"
  ROOT %t = (s32[], /*index=1*/f32[4]{0}) tuple(%p, %pool_in_loop)
}

ENTRY %main.7 (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %add_fusion = f32[4]{0} fusion(f32[4]{0} %x), kind=kLoop, calls=%fused_computation
  %ffi_call.3 = f32[4]{0} custom-call(%add_fusion), custom_call_target="DemOnednnConvBackwardWeights"
  %ffi_call.4 = f32[4]{0} custom-call(%ffi_call.3), custom_call_target="SomeoneElsesKernel"
  %loop = (s32[], f32[4]{0}) while(%x), condition=%cond, body=%body
  ROOT %copy.1 = f32[4]{0} copy(%ffi_call.4)
}
"""


def test_instruction_kinds_name_the_operations_a_program_runs_and_skip_those_inside_fusions():
  kinds = op_profile.instruction_kinds(HLO)
  assert kinds['add_fusion'] == 'XLA fusion' and kinds['copy.1'] == 'XLA copy' and kinds['loop'] == 'XLA while'
  assert kinds['ffi_call.3'] == 'conv kernel gradient (oneDNN)'
  assert kinds['ffi_call.4'] == 'SomeoneElsesKernel'  # an unknown target goes by its own name
  assert kinds['pool_in_loop'] == 'max-pool forward'  # a loop body's operations run as operations of their own
  assert 'inner_add' not in kinds and 'param_0' not in kinds  # they run inside their fusion
  with pytest.raises(ValueError, match='no ENTRY computation'):
    op_profile.instruction_kinds('%fused (p: f32[]) -> f32[] {\n}\n')


FORWARD_KINDS = ('conv forward (oneDNN)', 'max-pool forward', 'XLA fusion')
# At inference each BatchNorm runs inside the convolution before it (ops.conv.conv2d_folded_norm).
INFERENCE_KINDS = ('conv + BatchNorm [+ ReLU], inference (oneDNN)',
                   'conv + BatchNorm + residual + ReLU, inference (oneDNN)', 'max-pool forward', 'XLA fusion')
GRADIENT_KINDS = ('conv input gradient (oneDNN)', 'conv kernel gradient (oneDNN)', 'max-pool gradient',
                  'BatchNorm channel sums')


@pytest.mark.skipif(not onednn.available(), reason='the oneDNN handlers are not built here')
@pytest.mark.parametrize('benchmark, kinds', [('train_step', FORWARD_KINDS + GRADIENT_KINDS),
                                              ('embed', INFERENCE_KINDS)])
def test_model_benches_with_profile_steps_print_the_time_by_kind_of_operation(benchmark, kinds):
  cmd = [sys.executable, '-m', 'dem_jax', 'bench', benchmark, '--batch=2', '--frames=32', '--mels=16',
         '--width=0.125', '--steps=1', '--rounds=1', '--reference=none', '--profile_steps=2']
  # One device, as on a workstation: the operations of one program, not of four side by side.
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='1'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'time per call by kind of operation' in result.stdout
  report = json.loads(result.stdout.strip().splitlines()[-1])
  if benchmark == 'train_step':
    assert (report['dtype'], report['dtype_flag']) == ('float32', 'auto')  # 'auto' below half width: float32
  profile = report['profile_ms_per_call']
  by_kind = profile['by_kind']
  assert set(kinds) <= set(by_kind), by_kind  # each kind ran
  if benchmark == 'embed':  # inference: no gradient, and BatchNorm uses its running statistics
    assert not set(GRADIENT_KINDS + ('conv forward (oneDNN)',)) & set(by_kind), by_kind
  assert abs(sum(by_kind.values()) - profile['ops_ms']) < 0.01 * profile['ops_ms'] + 0.01
  # The operations run one after another here, within the traced calls' wall time.
  assert 0 < profile['ops_ms'] <= 1.2 * profile['wall_ms']
