"""The whole job end to end on built-in sample data: `dem-jax demo [WORKDIR]` (default ./demo_workdir).

Writes a synthetic DCASE 2018 task 5 development set, preprocesses it, trains a small model, evaluates it beside the
two no-learning baselines, and prints the headline figures and where the report is. Each stage is skipped when its
output is already complete, so a second run (or one after an interruption) finishes quickly.
"""

import logging
import sys

from absl import logging as absl_logging


def main(argv):
  if len(argv) > 2:
    sys.exit('usage: dem-jax demo [WORKDIR]')
  from dem_jax import demo
  from dem_jax import log_util
  from dem_jax import process
  process.retain_freed_memory_on_cpu()  # before the CPU backend starts its threads
  log_util.quiet_console()
  absl_logging.get_absl_handler().setFormatter(logging.Formatter('%(message)s'))  # a demo's lines, plain
  demo.run_demo(argv[1] if len(argv) > 1 else 'demo_workdir')
