"""Tiles per second that each way of feeding the train step delivers, ready on the device, on the same features.

    dem-jax bench input [--features_dir=DIR] [--tile_seconds=5] [--batch=64] [--seconds=5]

- device:     the packed float16 split on the device; triplets drawn and tiles cut by a compiled function (what
              the train step does before its forward pass).
- host:       the packed split in host memory; the loader's thread draws the same triplets, copies the tiles and
              sends them to the device, two calls ahead (config.data.store='host').
- tensorstore: the reference: every tile read from the zarr store through tensorstore and cast to float32 on the
              host, a batch at a time (how batches were read before the packed store).
- memcpy:     the floor of any host path: one contiguous copy of as many bytes as the tiles hold.
A tile is one of a triplet's three roles: a batch of 64 triplets is 192 tiles. Without --features_dir a DCASE-layout
sample set (--minutes of 10-s clips) is written and preprocessed in a temporary folder first. The last line is
JSON, with the ratios of the device and host paths to the references measured in the same run.
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import jax
import numpy as np

from dem_jax import input_pipeline
from dem_jax.features import open_features
from dem_jax.parallel import DataParallel
from dem_jax.sampler import ROLES, TripletSampler

GOALS = {'device_tiles_per_s': 30000, 'host_tiles_per_s': 20000}


def sample_features(minutes: float, work: str) -> str:
  from dem_jax.configs import features as features_config
  from dem_jax.preprocess import job
  from dem_jax.preprocess import sample_data
  data_dir, out = os.path.join(work, 'data'), os.path.join(work, 'features')
  clips = max(2, int(np.ceil(minutes * 6)))
  sessions = max(1, int(np.ceil(clips / (9 * 2 * 3))))
  sample_data.write_dcase2018_task5(data_dir, sessions_per_label=sessions, clips_per_session=3, nodes=2)
  job.run(features_config.get_config(), dataset='dcase2018_task5', data_dir=data_dir, output_dir=out,
          num_workers=os.cpu_count() or 1)
  return out


def rate(run_batches, tiles_per_batch: int, seconds: float) -> tuple[float, int]:
  """(tiles per second, batches) of `run_batches(n)` (which must finish its n batches), run for about `seconds`."""
  run_batches(2)  # Warm-up: compilation, first allocations.
  n, elapsed = 2, 0.0
  while elapsed < seconds / 4:
    n *= 2
    t0 = time.perf_counter()
    run_batches(n)
    elapsed = time.perf_counter() - t0
  n = max(2, int(n * seconds / 4 / elapsed * 4))
  t0 = time.perf_counter()
  run_batches(n)
  return n * tiles_per_batch / (time.perf_counter() - t0), n


def main(argv: list[str]) -> None:
  p = argparse.ArgumentParser(prog='bench input', description=__doc__)
  p.add_argument('--features_dir', default=None, help='A preprocessing output (default: a generated sample set).')
  p.add_argument('--minutes', type=float, default=30.0, help='Audio of the generated sample set.')
  p.add_argument('--tile_seconds', type=float, default=5.0)
  p.add_argument('--neighbour_seconds', type=float, default=5.0)
  p.add_argument('--batch', type=int, default=64, help='Triplets per step (3 tiles each).')
  p.add_argument('--seconds', type=float, default=5.0, help='Timed seconds per path.')
  args = p.parse_args(argv)

  work = tempfile.mkdtemp(prefix='dem_jax_bench_input_')
  try:
    features_dir = args.features_dir or sample_features(args.minutes, work)
    features = open_features(features_dir)
    tile = features.frontend.frames_for_seconds(args.tile_seconds)
    neighbour = int(round(args.neighbour_seconds * features.frame_rate))
    sampler = TripletSampler(features.select(features.train_splits(1 if features.folds() else None)),
                             tile_frames=tile, neighbour_frames=neighbour)
    t0 = time.perf_counter()
    packed = input_pipeline.pack_timelines(features, sampler)
    pack_s = time.perf_counter() - t0
    tiles_per_batch = 3 * args.batch
    parallel = DataParallel('jit', devices=jax.local_devices()[:1])
    print(f'{sampler.total_frames} frames packed in {pack_s:.2f} s ({packed.nbytes / 2**20:.0f} MiB float16); '
          f'tiles of {tile} x {features.n_mels}, {args.batch} triplets per step', flush=True)

    # Device store: the compiled draw-and-cut the train step runs before its forward pass.
    batch_fn = input_pipeline.device_batch_fn(parallel, batch_size=args.batch, tile_frames=tile,
                                              neighbour_frames=neighbour)
    data = parallel.put_replicated((packed, sampler.tables, sampler.data_key))
    cut = jax.jit(lambda d, step: batch_fn(d, step, 0))
    steps = [parallel.put_replicated(np.int32(s)) for s in range(64)]

    def device_batches(n):
      out = None
      for i in range(n):
        out = cut(data, steps[i % 64])
      jax.block_until_ready(out)

    # Host store: the loader's thread, two calls ahead, into device arrays.
    loader = input_pipeline.HostTileLoader(packed, sampler, args.batch, 1, put=parallel.put_host_batches)
    counter = {'step': 0}

    def host_batches(n):
      out = None
      for _ in range(n):
        s = counter['step']
        out = loader.get(s, 1, ahead=[(s + 1, 1), (s + 2, 1)])
        counter['step'] += 1
      jax.block_until_ready(out)

    # References: per-tile tensorstore reads cast to float32; one contiguous memcpy of the same bytes.
    def tensorstore_batches(n):
      for step in range(n):
        triplets = sampler.sample(step, args.batch)
        for role in ROLES:
          requests = [piece for tl, pos in zip(*triplets[role]) for piece in sampler.pieces(int(tl), int(pos))]
          features.read_many(requests)

    source = packed[:min(packed.shape[0], tiles_per_batch * tile)]
    target = np.empty_like(source)

    def memcpy_batches(n):
      for _ in range(n):
        np.copyto(target, source)

    results = {}
    for name, fn in [('device', device_batches), ('host', host_batches), ('tensorstore', tensorstore_batches),
                     ('memcpy', memcpy_batches)]:
      per_s, n = rate(fn, tiles_per_batch if name != 'memcpy' else source.shape[0] // tile, args.seconds)
      results[name] = per_s
      print(f'{name:>12}: {per_s:10.0f} tiles/s ({n} batches)', flush=True)
    loader.close()
    out = {
        'benchmark': 'input', 'backend': jax.default_backend(), 'features_dir': features.root,
        'tile': [tile, features.n_mels], 'batch_triplets': args.batch, 'packed_mib': round(packed.nbytes / 2**20, 1),
        'pack_seconds': round(pack_s, 2),
        'device_tiles_per_s': round(results['device']), 'host_tiles_per_s': round(results['host']),
        'tensorstore_tiles_per_s': round(results['tensorstore']), 'memcpy_tiles_per_s': round(results['memcpy']),
        'device_over_tensorstore': round(results['device'] / results['tensorstore'], 2),
        'host_over_tensorstore': round(results['host'] / results['tensorstore'], 2),
        'host_over_memcpy': round(results['host'] / results['memcpy'], 2),
        'goals_met': {k: results[k.split('_')[0]] >= v for k, v in GOALS.items()},
    }
    print(json.dumps(out))
  finally:
    shutil.rmtree(work, ignore_errors=True)
