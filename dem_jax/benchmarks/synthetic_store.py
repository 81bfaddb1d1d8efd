"""A synthetic feature store of N hours, written quickly for the input benchmarks: random float16 frames written
straight through tensorstore in the store format preprocessing writes (`features.array_spec`, manifest.csv,
features.json), with no audio rendered. Recordings of 10-s clips, consecutive within a recording, two recordings
(nodes) per session, all in the 'train' split.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import tensorstore as ts

from dem_jax import features as features_lib
from dem_jax.configs import features as features_config

CLIP_SECONDS = 10.0
LABELS = ('absence', 'cooking', 'working')


def write_synthetic_store(output_dir: str, hours: float, *, recording_minutes: float = 10.0, seed: int = 0) -> str:
  """Writes the store to `output_dir` (which must not exist) and returns it."""
  config = features_config.get_config()
  frontend, storage = config.frontend.to_dict(), config.storage.to_dict()
  n_mels = frontend['n_mels']
  clip_frames = int(round(CLIP_SECONDS * frontend['sample_rate'] / frontend['hop_length']))
  clips_per_recording = max(1, int(round(recording_minutes * 60 / CLIP_SECONDS)))
  num_clips = max(2 * clips_per_recording, int(round(hours * 3600 / CLIP_SECONDS)))
  total = num_clips * clip_frames
  os.makedirs(output_dir)
  spec = features_lib.array_spec(os.path.join(output_dir, features_lib.ARRAY_NAME), num_frames=total, n_mels=n_mels,
                                 dtype=storage['dtype'], chunk_frames=storage['chunk_frames'],
                                 shard_frames=storage['shard_frames'], compression=storage['compression'])
  array = ts.open(spec, create=True).result()
  # A pool of random frames, written from shifting offsets: random data does not compress, as real features barely
  # do, and drawing every frame anew would take longer than writing it.
  rng = np.random.default_rng(seed)
  pool = (rng.standard_normal((1 << 18, n_mels), np.float32) * 2 - 8).astype(np.float16)
  shard = storage['shard_frames']
  pending = []
  for start in range(0, total, shard):
    stop = min(start + shard, total)
    first = int(rng.integers(0, len(pool) - shard))
    pending.append(array[start:stop].write(pool[first:first + stop - start]))
    if len(pending) >= 8:
      pending.pop(0).result()
  for future in pending:
    future.result()

  clips = []
  for i in range(num_clips):
    recording, position = divmod(i, clips_per_recording)
    clips.append(features_lib.Clip(
        clip_id=f'rec{recording:05d}_{position:04d}', path=f'synthetic/rec{recording:05d}_{position:04d}.wav',
        label=LABELS[recording % len(LABELS)], group=f'session{recording // 2:05d}', recording=f'rec{recording:05d}',
        position=position, split='train', frame_offset=i * clip_frames, num_frames=clip_frames,
        duration=CLIP_SECONDS))
  manifest_path = os.path.join(output_dir, features_lib.MANIFEST_NAME)
  features_lib.write_manifest(manifest_path, clips)
  with open(manifest_path, 'rb') as f:
    manifest_sha256 = hashlib.sha256(f.read()).hexdigest()
  # The pool's statistics stand in for the frames' (the input path never reads them).
  count = float(total)
  mean, mean_sq = pool.astype(np.float64).mean(axis=0), (pool.astype(np.float64) ** 2).mean(axis=0)
  info = {
      'dataset': 'synthetic', 'data_dir': '', 'frontend': frontend, 'storage': storage, 'trim_top_db': 60.0,
      'labels': list(LABELS), 'total_frames': total, 'num_clips': num_clips, 'manifest_sha256': manifest_sha256,
      'band_sums': {'train': {'count': count, 'sum': (mean * count).tolist(), 'sum_sq': (mean_sq * count).tolist()}},
      'store_files': features_lib.store_files(output_dir),
  }
  with open(os.path.join(output_dir, features_lib.INFO_NAME), 'w', encoding='utf-8') as f:
    json.dump(info, f, indent=1, sort_keys=True)
  return output_dir
