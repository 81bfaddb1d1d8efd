"""The preprocessing job (the checkout's top-level preprocess/ package) under the dem_jax name.

    from dem_jax.preprocess import job, sample_data
    job.run(config, dataset='dcase2018_task5', data_dir=IN, output_dir=OUT)

Command line: `python -m dem_jax.preprocess --dataset=... --data_dir=... --output_dir=...` (as `./launch.sh
preprocess`).
"""

from preprocess import job
from preprocess import sample_data

__all__ = ['job', 'sample_data']
