r"""Train an embedding: `dem-jax train --config=dcase --workdir=W [--config.X=...] [--distributed]`.

Exit status: 0 when training reached config.num_steps or its time budget; 1 with one line naming the cause and the
fix otherwise (a setting, the features, the workdir or another run holding it, a non-finite step, the disk); 130
when interrupted. Either way the same command resumes from the last checkpoint.
"""

import logging
import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config: a Python file with get_config '
                                          '(configs/dcase.py:tiny) or a short name (dcase, dcase:tiny, music:cpu).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and the config go here; a run resumes from it.',
                               required=True)
_DISTRIBUTED = flags.DEFINE_bool('distributed', False,
                                 'Multi-host: call jax.distributed.initialize() (cluster env or flags).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (else from the cluster environment).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in all (with --coordinator_address).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (with --coordinator_address).')
flags.mark_flag_as_required('config')


def main(argv):
  del argv
  from dem_jax import process
  from dem_jax import log_util
  process.retain_freed_memory_on_cpu()  # The step frees and re-allocates the same large buffers every time.
  log_util.quiet_console()
  import jax
  from dem_jax import train
  from dem_jax.features import FeaturesError
  if _DISTRIBUTED.value:
    kwargs = {}
    if _COORDINATOR.value:
      kwargs = dict(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                    process_id=_PROCESS_ID.value)
    jax.distributed.initialize(**kwargs)
  logging.info('JAX process %d of %d, local devices: %s', jax.process_index(), jax.process_count(),
               jax.local_devices())
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (train.TrainingError, ValueError, FeaturesError) as e:
    sys.exit(f'train: {e}')
