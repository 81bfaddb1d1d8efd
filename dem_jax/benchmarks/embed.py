"""Segments per second of the forward pass (inference mode) on random tiles, beside PyTorch eager.

    python -m dem_jax.bench embed --batch=32 --frames=64 --mels=128 --conv_impl=auto,im2col,xla

Prints progress, then one JSON line (last) with `segments_per_s` (median window of the first conv_impl), every
candidate's windows, compile seconds, and the PyTorch reference with the ratio. `--profile_steps=N` adds the time
per batch by kind of operation (`profile_ms_per_call`, benchmarks/op_profile.py).
"""


import jax
import ml_collections
import numpy as np
import optax

from dem_jax import process
from dem_jax import models
from dem_jax import train_step as step_lib
from dem_jax.benchmarks import harness
from dem_jax.benchmarks import op_profile


def _jax_candidate(flags, conv_impl: str):
  """(run(steps) -> seconds per batch, compile seconds, profile(calls) -> op_profile.op_times) for one conv_impl."""
  model_config = ml_collections.ConfigDict(dict(name=flags.model, width=flags.width, embedding_dim=128,
                                                dropout_rate=0.5, conv_impl=conv_impl, dtype=flags.dtype))
  model = models.create_model(model_config)
  state = step_lib.create_train_state(jax.random.key(0), model, optax.identity(), (flags.frames, flags.mels))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  embed = step_lib.make_embed_fn(model)
  tiles = jax.device_put(np.random.default_rng(0).standard_normal((flags.batch, flags.frames, flags.mels),
                                                                  np.float32))

  def one_call():
    return embed(variables, tiles)

  def profile(calls: int) -> dict:
    return op_profile.op_times(one_call, embed.lower(variables, tiles).compile().as_text(), calls)

  return (*harness.timed_candidate(one_call), profile)


def main(argv: list[str]) -> None:
  flags = harness.parse_flags(argv, 'embed', default_steps=10)
  if flags.retain_memory:
    process.retain_freed_memory()
  candidates, compile_s, profiles = {}, {}, {}
  for conv_impl in flags.conv_impls:
    print(f'compiling the forward pass with conv_impl={conv_impl} ...', flush=True)
    candidates[f'jax_{conv_impl}'], compile_s[conv_impl], profiles[conv_impl] = _jax_candidate(flags, conv_impl)

  result = {'benchmark': 'embed', 'backend': jax.default_backend(), 'devices': 1, 'model': flags.model,
            'width': flags.width, 'batch_segments': flags.batch, 'tile': [flags.frames, flags.mels],
            'dtype': flags.dtype, 'conv_impl': flags.conv_impls[0], 'steps_per_window': flags.steps,
            'rounds': flags.rounds, 'retain_memory': bool(flags.retain_memory),
            'compile_and_first_call_s': {k: round(v, 2) for k, v in compile_s.items()}}
  harness.run_and_report(result, candidates, flags, mode='embed', rate_key='segments_per_s',
                         time_key='seconds_per_batch', unit='segments/s', profile=profiles[flags.conv_impls[0]])
