"""Benchmarks that print figures (never timed tests): `dem-jax bench NAME [FLAGS]`.

  preprocess   the preprocessing job vs a plain librosa loop vs the bare numpy arithmetic, on the same audio
  train_step   the compiled triplet step on random inputs (with a PyTorch eager reference when available)
  embed        the forward pass alone
  embed_folder the embed command over a folder of 10-s clips, beside the forward pass of the same model
  input        tiles per second each store delivers to the device, against tensorstore reads and memcpy
  gpu          the prepared GPU check: bf16 step speed and MFU, input stall, store and parallel agreement
  quality      real-audio quality within a training budget: the model vs the no-learning baselines
               (--suite: instruments, speakers and everyday sounds, and their average)

Each prints its figures as JSON on the last line of its output; `dem-jax bench NAME --help` lists its flags.
"""

import importlib
import sys

BENCHMARKS = ('preprocess', 'train_step', 'embed', 'embed_folder', 'input', 'gpu', 'quality')
# Each benchmark parses its own flags (argparse, in dem_jax/benchmarks/NAME.py), so the dispatcher hands over argv.
PARSES_ITS_OWN_ARGUMENTS = True


def main(argv: list[str]) -> None:
  if argv[:1] in (['-h'], ['--help'], ['help']):
    print(__doc__.strip())
    return
  if not argv or argv[0] not in BENCHMARKS:
    sys.exit(f'usage: dem-jax bench {{{"|".join(BENCHMARKS)}}} [FLAGS]')
  importlib.import_module(f'dem_jax.benchmarks.{argv[0]}').main(argv[1:])
