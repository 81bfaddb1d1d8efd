"""Log-Mel feature settings for the preprocessing job (the original system's front end).

    dem-jax preprocess --dataset=dcase2018_task5 --data_dir=/data/DCASE2018-task5-dev \
        --output_dir=/data/features/dcase_dev --config=features

Any field can be overridden on the command line, e.g. `--config.frontend.n_mels=64` or
`--config.storage.dtype=float32`.
"""

import ml_collections


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  # 30-ms periodic Hann window every 10 ms, 1024-point FFT, magnitude, 128 HTK mel bands 50-8000 Hz, log(x + 1e-6).
  config.frontend = ml_collections.ConfigDict(dict(
      sample_rate=16000, win_length=480, hop_length=160, n_fft=1024, n_mels=128, fmin=50.0, fmax=8000.0, htk=True,
      mel_norm='', log_offset=1e-6))
  # Leading/trailing silence: 'auto' trims folder (music) data at trim_top_db below the peak and leaves DCASE
  # recordings (continuous sessions, where silence is the "absence" class) as they are; 'yes' or 'no' force it.
  config.trim_silence = 'auto'
  config.trim_top_db = 60.0
  # float16 halves the store; its rounding error on log-Mel values is far below the features' own noise
  # (docs/benchmarks.md has the measured round-trip error). Shards are the unit one writer owns.
  config.storage = ml_collections.ConfigDict(dict(
      dtype='float16', chunk_frames=512, shard_frames=32768, compression='zstd'))
  # Folder data without --split_file: a seeded split by file, stratified by label.
  config.split = ml_collections.ConfigDict(dict(test_fraction=0.2, seed=0))
  return config
