"""Embed an audio file or a folder with a trained model: `dem-jax embed --workdir=W --input=IN --output_dir=O`.

Prints one JSON line (files written, of which re-embedded because their output had other settings, already there,
skipped, the output folder); each skipped file goes to stderr with its reason. Exit status: 0 when at least one file
was embedded or already had its output; 1 with one line naming the problem otherwise.
"""

import json
import os
import sys

from absl import flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir.', required=True)
_INPUT = flags.DEFINE_string('input', None, 'An audio file or a folder (searched recursively).', required=True)
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Where the .npz files go (mirroring the input tree).',
                                  required=True)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_HOP_SECONDS = flags.DEFINE_float('hop_seconds', None, 'Tile hop in seconds, above 0 (default: the tile length).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Tiles per forward pass; tiles of many files share a batch.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Embed files whose output exists again (default: skip those '
                                'made with the same workdir, step, hop and representations).')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', None, 'Threads that decode files and compute their log-Mel ahead '
                                    'of the model (default: the usable cores, at most 4).')
_TRUNK = flags.DEFINE_bool('trunk', False, "Also write each tile's pooled trunk features (the head's input) as "
                           'trunk, and their mean as clip_trunk; outputs made without (or with) them are embedded '
                           'again.')


def main(argv):
  del argv
  from dem_jax import process
  from dem_jax import log_util
  process.retain_freed_memory_on_cpu()  # before the CPU backend starts its threads
  log_util.quiet_console()
  from dem_jax import embed
  try:
    summary = embed.run(_WORKDIR.value, _INPUT.value, _OUTPUT_DIR.value, step=_STEP.value,
                        hop_seconds=_HOP_SECONDS.value, batch_size=_BATCH_SIZE.value, overwrite=_OVERWRITE.value,
                        num_workers=_NUM_WORKERS.value, trunk=_TRUNK.value)
  except (embed.EmbedError, FileNotFoundError) as e:
    sys.exit(f'embed: {e}')
  for failure in summary['failures']:
    print(f'skipped {failure["path"]}: {failure["reason"]}', file=sys.stderr)
  print(json.dumps({'written': len(summary['written']), 'reembedded': len(summary['reembedded']),
                    'existing': len(summary['existing']), 'failures': len(summary['failures']),
                    'output_dir': os.path.abspath(_OUTPUT_DIR.value)}))
  if not summary['written'] and not summary['existing']:
    sys.exit('embed: no file could be embedded; the reasons are above and in embed_summary.json.')
