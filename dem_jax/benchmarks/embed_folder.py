"""The `embed` command's throughput over a folder of 10-s clips, beside the bare forward pass of the same model.

    python -m dem_jax.bench embed_folder [--clips=96] [--batch=64] [--width=1.0] [--rounds=2] [--per_file_clips=4]

All run in one process, taken in turn round after round (the machine may be shared), on one randomly initialised
ResNet of 5-s tiles (498 x 128, the default front end) and generated DCASE-layout clips (10 s, 4 channels, 16 kHz;
two tiles each, so the default 96 clips fill three batches of 64):
- forward:   full batches of random tiles through the compiled forward pass (what `bench embed` times).
- front_end: decoding and log-Mel of every clip in as many threads as the command decodes with (one BLAS thread
             each, as there), without the model.
- folder:    `embed_paths` end to end: decoding, log-Mel, tiles packed across files into full batches, one .npz per
             file.
- per_file:  each file's tiles in a batch of their own (the old command's way), on the first --per_file_clips clips.

Prints one JSON line (last) with tiles/s and audio-s/s of each, folder / forward, and folder / the slower of forward
and front_end (the command can go no faster than either).
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import tempfile
import time

import jax
import ml_collections
import numpy as np
import optax
import threadpoolctl

from dem_jax import embed
from dem_jax import models
from dem_jax import process
from dem_jax import train_step as step_lib
from dem_jax.frontend import FrontEnd
from dem_jax.ops import conv as conv_ops
from dem_jax.preprocess import sample_data


def main(argv: list[str]) -> None:
  p = argparse.ArgumentParser(prog='python -m dem_jax.bench embed_folder', description=__doc__)
  p.add_argument('--clips', type=int, default=96, help='10-s clips in the folder')
  p.add_argument('--batch', type=int, default=64, help='tiles per forward pass (embed --batch_size)')
  p.add_argument('--width', type=float, default=1.0, help='channel multiplier of the ResNet')
  p.add_argument('--model', default='resnet18', choices=('resnet18', 'resnet34'))
  p.add_argument('--conv_impl', default='auto', choices=conv_ops.CONV_IMPLS)
  p.add_argument('--num_workers', type=int, default=None, help='decoding threads (default: as the command)')
  p.add_argument('--rounds', type=int, default=2, help='timed rounds of each, interleaved')
  p.add_argument('--per_file_clips', type=int, default=4, help='clips timed the per-file way (0: skip)')
  args = p.parse_args(argv)
  process.retain_freed_memory()

  frontend = FrontEnd()
  tile_frames, hop_frames = frontend.frames_for_seconds(5.0), int(round(5.0 * frontend.frame_rate))
  model = models.create_model(ml_collections.ConfigDict(dict(name=args.model, width=args.width, embedding_dim=128,
                                                             dropout_rate=0.5, conv_impl=args.conv_impl)))
  state = step_lib.create_train_state(jax.random.key(0), model, optax.identity(), (tile_frames, frontend.n_mels))
  embedder = embed.Embedder.from_model(model, {'params': state.params, 'batch_stats': state.batch_stats},
                                       frontend=frontend, tile_frames=tile_frames, batch_size=args.batch,
                                       hop_frames=hop_frames)
  batch = embedder.embed_tiles.batch_size

  work = tempfile.mkdtemp(prefix='dem_jax_bench_embed_')
  try:
    sessions = max(1, -(-args.clips // (9 * 2 * 2)))  # 9 labels, 2 clips per session, 2 nodes
    sample_data.write_dcase2018_task5(work + '/data', sessions_per_label=sessions, clips_per_session=2, nodes=2)
    folder = os.path.join(work, 'data', 'audio')
    for extra in embed.find_audio_files(folder)[args.clips:]:
      os.remove(extra)
    paths = embed.find_audio_files(folder)
    num_workers = args.num_workers or embed.default_num_workers()
    audio_seconds = 10.0 * len(paths)
    tiles = np.random.default_rng(0).standard_normal((batch, tile_frames, frontend.n_mels)).astype(np.float32)

    def forward(steps: int) -> float:
      jax.block_until_ready(embedder.embed_tiles.dispatch(tiles))  # untimed: compiled and warm
      t = time.perf_counter()
      for _ in range(steps):
        out = embedder.embed_tiles.dispatch(tiles)
      jax.block_until_ready(out)
      return (time.perf_counter() - t) / (steps * batch)

    def folder_run() -> tuple[float, int]:
      t = time.perf_counter()
      summary = embed.embed_paths(embedder, folder, os.path.join(work, 'out'), overwrite=True,
                                  num_workers=num_workers, show_progress=False)
      seconds = time.perf_counter() - t
      if summary['failures']:
        raise RuntimeError(f'embed failed on generated audio: {summary["failures"][0]}')
      return seconds, sum(len(np.load(f)['timestamps']) for f in summary['written'])

    def front_end_run() -> tuple[float, int]:
      t = time.perf_counter()
      with threadpoolctl.threadpool_limits(1, user_api='blas'), \
          concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
        n = sum(len(f.starts) for f in pool.map(embedder._file_tiles, paths))
      return time.perf_counter() - t, n

    def per_file_run() -> tuple[float, int]:
      t = time.perf_counter()
      n = sum(len(embedder.embed_file(p)['timestamps']) for p in paths[:args.per_file_clips])
      return time.perf_counter() - t, n

    print(f'{len(paths)} clips of 10 s; compiling the forward pass (batch {batch}) ...', flush=True)
    forward(1)
    steps = max(1, -(-len(paths) * 2 // batch))  # about as many tiles as the folder holds
    rates = {'forward': [], 'front_end': [], 'folder': [], 'per_file': []}
    tiles_in_folder = 0
    for _ in range(args.rounds):
      rates['forward'].append(1 / forward(steps))
      seconds, n = front_end_run()
      rates['front_end'].append(n / seconds)
      seconds, tiles_in_folder = folder_run()
      rates['folder'].append(tiles_in_folder / seconds)
      if args.per_file_clips:
        seconds, n = per_file_run()
        rates['per_file'].append(n / seconds)
    tiles_per_clip = tiles_in_folder / len(paths)
    median = {k: statistics.median(v) for k, v in rates.items() if v}
    for name, rate in median.items():
      print(f'{name:>9}: {rate:8.2f} tiles/s  {rate / tiles_per_clip * 10:8.1f} audio-s/s  (windows '
            f'{[round(r, 2) for r in rates[name]]})', flush=True)
    result = {
        'benchmark': 'embed_folder', 'backend': jax.default_backend(), 'model': args.model, 'width': args.width,
        'conv_impl': args.conv_impl, 'batch': batch, 'tile': [tile_frames, frontend.n_mels], 'clips': len(paths),
        'audio_seconds': audio_seconds, 'tiles_per_clip': tiles_per_clip, 'rounds': args.rounds,
        'cpu_count': len(os.sched_getaffinity(0)),
        'tiles_per_s': {k: round(v, 2) for k, v in median.items()},
        'audio_s_per_s': {k: round(v / tiles_per_clip * 10, 1) for k, v in median.items()},
        'windows_tiles_per_s': {k: [round(r, 2) for r in v] for k, v in rates.items() if v},
        'num_workers': num_workers,
        'folder_over_forward': round(median['folder'] / median['forward'], 3),
        'folder_over_slower_part': round(median['folder'] / min(median['forward'], median['front_end']), 3),
    }
    if 'per_file' in median:
      result['folder_over_per_file'] = round(median['folder'] / median['per_file'], 2)
    print(json.dumps(result))
  finally:
    shutil.rmtree(work, ignore_errors=True)
