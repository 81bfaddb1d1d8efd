"""Triplets per second of the compiled train step on random tiles, beside the same step in PyTorch eager.

    dem-jax bench train_step --batch=32 --frames=64 --mels=128 --conv_impl=auto,im2col,xla [--dtype=float32]

Prints progress, then one JSON line (last) with `triplets_per_s` (median window of the first conv_impl), every
candidate's windows, compile seconds, and the PyTorch reference with the ratio. `--profile_steps=N` adds the time
per step by kind of operation (`profile_ms_per_call`, benchmarks/op_profile.py). The step computes in the dtype that
training's default `model.dtype='auto'` resolves to here (`dtype` in the JSON; `dtype_flag`: what --dtype asked for).
"""


import jax
import ml_collections
import numpy as np

from dem_jax import process
from dem_jax import losses
from dem_jax import models
from dem_jax import train_step as step_lib
from dem_jax.parallel import DataParallel
from dem_jax.benchmarks import harness
from dem_jax.benchmarks import op_profile


def _jax_candidate(flags, conv_impl: str, parallel: DataParallel):
  """(run(steps) -> seconds per step, compile seconds, profile(calls) -> op_profile.op_times) for one conv_impl."""
  model_config = ml_collections.ConfigDict(dict(name=flags.model, width=flags.width, embedding_dim=128,
                                                dropout_rate=0.5, conv_impl=conv_impl, dtype=flags.dtype))
  model = models.create_model(model_config, axis_name=parallel.axis_name)
  optimizer = step_lib.make_optimizer(ml_collections.ConfigDict(dict(
      learning_rate=1e-4, decay_rate=0.95, decay_steps=7500, weight_decay=1e-4, grad_clip_norm=0.0)))
  state = step_lib.create_train_state(jax.random.key(0), model, optimizer, (flags.frames, flags.mels))
  step_fn = parallel.compile_train_step(step_lib.make_train_step(model, optimizer, losses.get_loss_fn('triplet'),
                                                                 axis_name=parallel.axis_name))
  rng = np.random.default_rng(0)
  batch = parallel.put_batch({r: rng.standard_normal((flags.batch, flags.frames, flags.mels), np.float32)
                              for r in step_lib.ROLES})
  key, lr = jax.random.key(1), np.float32(1e-4)
  holder = {'state': parallel.put_state(state)}

  def one_step():
    holder['state'], metrics = step_fn(holder['state'], batch, key, lr)
    return metrics

  def profile(calls: int) -> dict:
    hlo = step_fn.lower(holder['state'], batch, key, lr).compile().as_text()
    return op_profile.op_times(one_step, hlo, calls)

  return (*harness.timed_candidate(one_step), profile)


def main(argv: list[str]) -> None:
  flags = harness.parse_flags(argv, 'train_step', default_steps=5)
  if flags.retain_memory:
    process.retain_freed_memory()
  parallel = DataParallel(flags.parallel)
  candidates, compile_s, profiles = {}, {}, {}
  for conv_impl in flags.conv_impls:
    print(f'compiling the step with conv_impl={conv_impl} ...', flush=True)
    candidates[f'jax_{conv_impl}'], compile_s[conv_impl], profiles[conv_impl] = _jax_candidate(flags, conv_impl,
                                                                                                parallel)

  result = {'benchmark': 'train_step', 'backend': jax.default_backend(), 'devices': len(jax.devices()),
            'parallel': flags.parallel, 'model': flags.model, 'width': flags.width, 'batch_triplets': flags.batch,
            'tile': [flags.frames, flags.mels], 'dtype': flags.dtype, 'dtype_flag': flags.dtype_flag,
            'conv_impl': flags.conv_impls[0], 'steps_per_window': flags.steps, 'rounds': flags.rounds,
            'retain_memory': bool(flags.retain_memory),
            'compile_and_first_step_s': {k: round(v, 2) for k, v in compile_s.items()}}
  harness.run_and_report(result, candidates, flags, mode='train_step', rate_key='triplets_per_s',
                         time_key='seconds_per_step', unit='triplets/s', profile=profiles[flags.conv_impls[0]])
