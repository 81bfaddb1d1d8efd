"""The prepared GPU check: one command, a few minutes, one JSON line.

    dem-jax bench gpu [--batch_per_device=128] [--steps=20] [--peak_tflops=N]

On a machine with GPUs (every local one is used) it measures, for 5-s tiles (498 x 128) and full-width ResNet18:
1. the bfloat16 train step, compiled with jit over a mesh and with pmap: triplets/s and MFU (3 x XLA's FLOP count
   of the forward pass per tile, for forward and backward, over the devices' dense bf16 peak);
2. the input stall: `train_and_evaluate` on generated features, device store and host store, in steps/s against
   the bare step of the same shape (the same compiled step fed one pre-placed batch);
3. agreement: the loss and gradients of one batch on 1 device, with pmap and with jit over all devices.
On a CPU-only machine it says so and exits 0; `--allow_cpu` runs it anyway (small shapes for a quick look).
The last line is JSON.
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import jax
import ml_collections
import numpy as np
import optax

from dem_jax import losses
from dem_jax import models
from dem_jax import train_step as step_lib
from dem_jax.frontend import FrontEnd
from dem_jax.parallel import DataParallel

# Dense bf16 peak per device, TFLOP/s, by the start of jax's device_kind (override with --peak_tflops).
PEAK_BF16_TFLOPS = {'NVIDIA H200': 989.0, 'NVIDIA H100': 989.0, 'NVIDIA A100': 312.0, 'NVIDIA L40S': 362.0,
                    'NVIDIA A10': 125.0, 'NVIDIA L4': 121.0}


def peak_tflops(device, flag: float) -> float | None:
  if flag:
    return flag
  return next((v for k, v in PEAK_BF16_TFLOPS.items() if device.device_kind.startswith(k)), None)


def model_config(args) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(name='resnet18', width=args.width, embedding_dim=128, dropout_rate=0.5,
                                        conv_impl='auto', dtype=args.dtype))


def optimizer_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(learning_rate=1e-4, schedule='staircase', decay_rate=0.95, decay_steps=7500,
                                        weight_decay=1e-4, grad_clip_norm=0.0))


def forward_flops_per_tile(model, state, args) -> float:
  """XLA's FLOP count of the forward pass on one tile, compiled for one device (no partitioning to account for)."""
  variables = {'params': jax.device_get(state.params), 'batch_stats': jax.device_get(state.batch_stats)}
  tile = np.zeros((1, args.frames, args.mels), np.float32)
  cost = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, tile).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0)) if cost else 0.0


def bare_step(args, mode: str, devices) -> dict:
  """Triplets/s of the compiled step on one pre-placed batch, and its FLOPs per step."""
  parallel = DataParallel(mode, devices=devices)
  model = models.create_model(model_config(args), axis_name=parallel.axis_name)
  optimizer = step_lib.make_optimizer(optimizer_config())
  loss_fn = losses.get_loss_fn('triplet')
  host_state = step_lib.create_train_state(jax.random.key(0), model, optimizer, (args.frames, args.mels))
  step = parallel.compile_train_step(step_lib.make_train_step(model, optimizer, loss_fn, axis_name=parallel.axis_name))
  batch_size = args.batch_per_device * len(devices)
  rng = np.random.default_rng(0)
  batch = parallel.put_batch({r: rng.standard_normal((batch_size, args.frames, args.mels)).astype(np.float16)
                              for r in step_lib.ROLES})
  state = parallel.put_state(host_state)
  key, lr = jax.random.key(1), np.float32(1e-4)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, key, lr).compile()
  compile_s = time.perf_counter() - t0
  # Counted on XLA's own convolutions: a custom call (oneDNN's on CPU) has no FLOP count.
  counted = model_config(args)
  counted.conv_impl = 'xla'
  flops = 3 * 3 * batch_size * forward_flops_per_tile(models.create_model(counted), host_state, args)
  for _ in range(3):
    state, metrics = compiled(state, batch, key, lr)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, batch, key, lr)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - t0) / args.steps
  out = {'triplets_per_s': batch_size / seconds, 'steps_per_s': 1 / seconds, 'compile_s': round(compile_s, 1),
         'flops_per_step': flops}
  peak = peak_tflops(devices[0], args.peak_tflops)
  if peak and flops:
    out['mfu'] = flops / seconds / (peak * 1e12 * len(devices))
  return out


def train_rate(args, features_dir: str, store: str, work: str) -> float:
  """steps/s that `train_and_evaluate` logs (training time only) for the same shape, from generated features."""
  from dem_jax.configs import dcase as dcase_config
  from dem_jax import train as train_lib
  from dem_jax.metric_writer import read_metrics
  config = dcase_config.get_config()
  config.features_dir = features_dir
  config.model = model_config(args)
  fe = FrontEnd()
  config.data.tile_seconds = (fe.win_length + (args.frames - 1) * fe.hop_length) / fe.sample_rate  # 5 s: 498
  config.data.store = store
  config.data.fold = 0  # Every clip trains; nothing held out (no evaluation is timed here).
  config.batch_size = args.batch_per_device * jax.device_count()
  config.num_steps = 2 * args.steps
  config.log_every = args.steps
  config.eval_every = config.checkpoint_every = 10 * args.steps
  config.data.eval_batches = 0
  config.data.eval_max_clips = 0
  workdir = os.path.join(work, f'train_{store}')
  train_lib.train_and_evaluate(config, workdir)
  rates = [r['train/steps_per_s'] for r in read_metrics(workdir) if 'train/steps_per_s' in r]
  return float(rates[-1])  # The second window: past the first calls' warm-up.


def agreement(args) -> dict:
  """Largest relative difference of the loss and of the gradients: pmap and jit over all devices vs 1 device."""
  devices = jax.local_devices()
  model_cfg = model_config(args)
  model_cfg.dropout_rate = 0.0
  loss_fn = losses.get_loss_fn('triplet')
  batch_size = 2 * len(devices)
  rng = np.random.default_rng(1)
  batch = {r: rng.standard_normal((batch_size, args.frames, args.mels)).astype(np.float32) for r in step_lib.ROLES}
  sgd = optax.sgd(1.0)
  results = {}
  for name, mode, devs in [('single', 'jit', devices[:1]), ('pmap', 'pmap', devices), ('jit', 'jit', devices)]:
    parallel = DataParallel(mode, devices=devs)
    model = models.create_model(model_cfg, axis_name=parallel.axis_name)
    state = step_lib.create_train_state(jax.random.key(0), model, sgd, (args.frames, args.mels))
    step = parallel.compile_train_step(step_lib.make_train_step(model, sgd, loss_fn, axis_name=parallel.axis_name))
    before = jax.device_get(state.params)
    new_state, metrics = step(parallel.put_state(state), parallel.put_batch(batch), jax.random.key(1),
                              np.float32(1.0))
    after = parallel.get_state(new_state).params
    grads = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), before, after)
    results[name] = (parallel.get_metrics(metrics)['loss'], grads)
  out = {}
  loss_1, grads_1 = results['single']
  for name in ('pmap', 'jit'):
    loss, grads = results[name]
    diffs = jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)), grads, grads_1))
    out[name] = {'loss_rel_diff': abs(loss - loss_1) / max(abs(loss_1), 1e-12), 'grad_max_rel_diff': max(diffs)}
  return out


def main(argv: list[str]) -> None:
  p = argparse.ArgumentParser(prog='bench gpu', description=__doc__)
  p.add_argument('--batch_per_device', type=int, default=128, help='Triplets per device per step.')
  p.add_argument('--steps', type=int, default=20, help='Timed steps per measurement.')
  p.add_argument('--frames', type=int, default=498)
  p.add_argument('--mels', type=int, default=128)
  p.add_argument('--width', type=float, default=1.0)
  p.add_argument('--dtype', default='bfloat16')
  p.add_argument('--peak_tflops', type=float, default=0.0, help="Per-device dense bf16 peak (default: by device).")
  p.add_argument('--allow_cpu', action='store_true', help='Run on CPU too (use small shapes).')
  p.add_argument('--minutes', type=float, default=20.0, help='Audio generated for the input-stall runs.')
  args = p.parse_args(argv)
  backend = jax.default_backend()
  if backend == 'cpu' and not args.allow_cpu:
    print('bench gpu: no GPU here (JAX backend: cpu); nothing to measure. Run it on a GPU node, or pass '
          '--allow_cpu for a quick look on the CPU.')
    print(json.dumps({'benchmark': 'gpu', 'skipped': 'no GPU', 'backend': backend}))
    return
  t_start = time.time()
  devices = jax.local_devices()
  result = {'benchmark': 'gpu', 'backend': backend, 'devices': len(devices), 'device_kind': devices[0].device_kind,
            'tile': [args.frames, args.mels], 'width': args.width, 'dtype': args.dtype,
            'batch_per_device': args.batch_per_device, 'jax': jax.__version__}
  for mode in ('jit', 'pmap'):
    print(f'bare step, {mode} over {len(devices)} device(s) ...', flush=True)
    result[f'step_{mode}'] = bare_step(args, mode, devices)
    print(f'  {result[f"step_{mode}"]}', flush=True)
  work = tempfile.mkdtemp(prefix='dem_jax_bench_gpu_')
  try:
    from dem_jax.benchmarks.input import sample_features
    features_dir = sample_features(args.minutes, work)
    for store in ('device', 'host'):
      print(f'train_and_evaluate with the {store} store ...', flush=True)
      rate = train_rate(args, features_dir, store, work)
      result[f'train_{store}_steps_per_s'] = rate
      result[f'train_{store}_over_bare_step'] = rate / result['step_jit']['steps_per_s']
      print(f'  {rate:.2f} steps/s, {result[f"train_{store}_over_bare_step"]:.3f} of the bare step', flush=True)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  print('agreement of pmap / jit / 1 device ...', flush=True)
  result['agreement'] = agreement(args)
  result['wall_s'] = round(time.time() - t_start, 1)
  print(json.dumps(result))
