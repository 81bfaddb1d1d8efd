"""Judge a trained model: `dem-jax evaluate --workdir=W [--features_dir=F] [--output_dir=O] [--step=N]`.

On a DCASE development set, `--workdir=W1,W2,W3,W4` (or the flag repeated) names one workdir per fold, each trained
with --config.data.fold=k: fold k is then scored on the embedding that never heard its evaluate clips.

Prints the summary table and where the report is. Exit status: 0 with a report; 1 with one line naming the problem
(not a workdir, features made with other settings, a fold without its workdir, an output folder that cannot be
written) otherwise.
"""

import os
import sys

from absl import flags

_WORKDIR = flags.DEFINE_multi_string(
    'workdir', None, 'Training workdir; on a DCASE development set, one per fold (trained with data.fold=k), '
    'comma-separated or the flag repeated.', required=True)
_FEATURES_DIR = flags.DEFINE_string('features_dir', None,
                                    'Features to evaluate on (default: those the model trained on).')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Where the report goes (default: WORKDIR/eval_<step>; with one '
                                   'workdir per fold, the fold-1 workdir\'s eval_per_fold_<step>).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step of a single workdir (default: the latest).')
_RETRIEVAL_K = flags.DEFINE_integer('retrieval_k', 5, 'k of precision@k.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the probe, k-Means, t-SNE and the random-init baseline.')
_PLOT = flags.DEFINE_bool('plot', True, 'Draw the figures (PNGs beside the report, images in TensorBoard).')


def main(argv):
  del argv
  from dem_jax import process
  from dem_jax import log_util
  process.retain_freed_memory_on_cpu()  # before the CPU backend starts its threads
  log_util.quiet_console()
  from dem_jax import evaluate
  from dem_jax import report_markdown
  from dem_jax.features import FeaturesError
  try:
    workdirs = [w for value in _WORKDIR.value for w in value.split(',') if w]
    report = evaluate.evaluate(workdirs, features_dir=_FEATURES_DIR.value, output_dir=_OUTPUT_DIR.value,
                               step=_STEP.value, retrieval_k=_RETRIEVAL_K.value, seed=_SEED.value, plot=_PLOT.value)
  except (ValueError, FileNotFoundError, FeaturesError) as e:
    sys.exit(f'evaluate: {e}')
  print(report_markdown.format_summary_table(report))
  print(f'report: {os.path.join(report["output_dir"], "report.md")}')
