r"""Preprocess an audio data set into log-Mel features: zarr shards written with tensorstore.

One machine, one worker process per usable core (finalizes by itself; --num_workers=N for another count):
  dem-jax preprocess --dataset=dcase2018_task5 --data_dir=/data/dcase_dev --output_dir=/data/feats/dcase_dev
A cluster array job of n tasks (each writes disjoint shards), then one finalize:
  dem-jax preprocess ... --task_index=$SLURM_ARRAY_TASK_ID --num_tasks=64
  dem-jax preprocess ... --finalize
Folder data (<root>/<label>/<file>), with a published split:
  dem-jax preprocess --dataset=folder --data_dir=/data/gtzan --output_dir=/data/feats/gtzan \
      --split_file=gtzan_split.csv
A killed job, run again with the same command, finishes what is left and gives the same output.

Exit codes (a bad run ends with one line on stderr that names the file or setting and the fix):
  0  done (files that failed are listed in summary.json), or this task of an array job done
  1  the job could not run: a flag or setting, the data set's lists or folders, the output folder, or the disk
  3  it ran, but no clip could be written (each file's reason is in summary.json)
  4  --strict and at least one file failed
  130  interrupted (Ctrl-C); the same command finishes the job
"""

import json
import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

from dem_jax import configs
from dem_jax import datasets
from dem_jax import features
from dem_jax.preprocess import job

EXIT_ERROR = 1
EXIT_NOTHING_WRITTEN = 3
EXIT_STRICT = 4

_CONFIG = config_flags.DEFINE_config_file(
    'config', configs.path('features'), 'Feature settings: a Python config file, or a short name (features).')
_DATASET = flags.DEFINE_enum('dataset', None, list(datasets.DATASETS), 'Layout of --data_dir.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Root folder of the dataset.')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Where the features, manifest and summary go.', required=True)
_SPLIT_FILE = flags.DEFINE_string('split_file', None, 'Folder data: CSV with columns file,split[,extra] to use as '
                                  'given.')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', None, 'Processes that do blocks on this machine, this one '
                                    'included (default: the usable cores, from the affinity mask; their BLAS threads '
                                    'share the cores out).')
_TASK_INDEX = flags.DEFINE_integer('task_index', 0, 'This task of --num_tasks (array jobs).')
_NUM_TASKS = flags.DEFINE_integer('num_tasks', 1, 'Independent tasks the job is split into.')
_FINALIZE = flags.DEFINE_bool('finalize', False, 'Only assemble manifest, statistics and summary (after all tasks).')
_STRICT = flags.DEFINE_bool('strict', False, 'Exit non-zero when any file failed.')


def fail(message: str, code: int = EXIT_ERROR):
  print(f'preprocess: {message}', file=sys.stderr)
  sys.exit(code)


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  if not _FINALIZE.value and (not _DATASET.value or not _DATA_DIR.value):
    fail('--dataset and --data_dir are required (except with --finalize); see --help.')
  num_workers = job.usable_cores() if _NUM_WORKERS.value is None else _NUM_WORKERS.value
  if num_workers < 1:
    fail(f'--num_workers={num_workers}; give 1 or more.')
  try:
    summary = job.run(_CONFIG.value, dataset=_DATASET.value, data_dir=_DATA_DIR.value,
                      output_dir=_OUTPUT_DIR.value, split_file=_SPLIT_FILE.value, num_workers=num_workers,
                      task_index=_TASK_INDEX.value, num_tasks=_NUM_TASKS.value, finalize_only=_FINALIZE.value)
  except (job.PreprocessError, datasets.DatasetError, features.FeaturesError) as e:
    fail(str(e))
  if summary is None:
    return
  for failure in summary['failures']:
    logging.warning('failed: %s: %s', failure['path'], failure['reason'])
  print(json.dumps({k: summary[k] for k in ('clips_written', 'clips_planned', 'audio_seconds', 'wall_seconds')}
                   | {'failures': len(summary['failures']),
                      'summary': os.path.join(os.path.abspath(_OUTPUT_DIR.value), 'summary.json')}))
  if summary['clips_written'] == 0:
    fail("no clip could be written; see summary.json for each file's reason.", EXIT_NOTHING_WRITTEN)
  if _STRICT.value and summary['failures']:
    fail(f'{len(summary["failures"])} file(s) failed and --strict is set; see summary.json.', EXIT_STRICT)
