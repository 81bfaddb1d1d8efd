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

    dem-jax bench input --synthetic_hours=40 --store=stream --resident_gb=0.5 [--seconds=10]

With --store=stream (or --synthetic_hours), the streamed store (config.data.store='stream') against the packed host
store on the same data: tiles/s delivered (window turnover and reads included), the process's peak RSS, GB read
and the time to the first batch (opening the store, reading the first window or packing, compiling the cut). Each
store runs in a fresh process, so that its peak RSS is its own; the packed one only where the split fits in half
the host's memory. --synthetic_hours=N first writes a synthetic store of N hours (random float16 frames in the
store format, `synthetic_store`) in a temporary folder, deleted afterwards. GB are 10^9 bytes.
"""

import argparse
import json
import multiprocessing
import os
import resource
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
STREAM_GOALS = {'stream_tiles_per_s': 20000}


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
  p.add_argument('--store', default='', choices=['', 'stream'],
                 help="'stream': the streamed store against the packed host store (see above).")
  p.add_argument('--resident_gb', type=float, default=0.5, help='The streamed window (config.data.resident_gb).')
  p.add_argument('--place', default='auto', choices=['auto', 'device', 'host'],
                 help='Where the streamed window lives (auto: as training picks it).')
  p.add_argument('--synthetic_hours', type=float, default=0.0, help='Write a synthetic store of this many hours.')
  p.add_argument('--both_places', action=argparse.BooleanOptionalAction, default=True,
                 help='Also measure the streamed window in the other place (device or host memory).')
  p.add_argument('--work_dir', default=None, help='Where the synthetic store is written (default: a temp folder).')
  args = p.parse_args(argv)
  if args.synthetic_hours or args.store == 'stream':
    return stream_main(args)

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


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB.


def _split(features_dir: str, args):
  features = open_features(features_dir)
  tile = features.frontend.frames_for_seconds(args['tile_seconds'])
  neighbour = int(round(args['neighbour_seconds'] * features.frame_rate))
  sampler = TripletSampler(features.select(features.train_splits(1 if features.folds() else None)),
                           tile_frames=tile, neighbour_frames=neighbour)
  return features, sampler


def _timed(batch_at, tiles_per_batch: int, seconds: float, t0: float) -> dict:
  """Delivery of `batch_at(step)` (each ready on the device): the first batch's time since t0, then tiles/s over
  about `seconds`."""
  jax.block_until_ready(batch_at(0))
  first = time.perf_counter() - t0
  step, start = 1, time.perf_counter()
  while time.perf_counter() - start < seconds:
    jax.block_until_ready(batch_at(step))
    step += 1
  return {'first_batch_s': first, 'tiles_per_s': (step - 1) * tiles_per_batch / (time.perf_counter() - start),
          'steps': step}


def _measure_stream(features_dir: str, args: dict, out) -> None:
  """In a fresh process: the streamed store as training feeds it; results into the queue `out`."""
  from dem_jax import streaming
  t0 = time.perf_counter()
  features, sampler = _split(features_dir, args)
  parallel = DataParallel('jit', devices=jax.local_devices()[:1])
  batch = args['batch']
  store = streaming.StreamStore(features, sampler, parallel, global_batch=batch, steps_per_call=1,
                                steps_per_epoch=sampler.steps_per_epoch(batch), resident_gb=args['resident_gb'],
                                device_fraction=0.5, place=args['place'])
  cut = jax.jit(lambda d, step: store.batch_fn(d, step, 0))
  steps_ahead = lambda s: [(s + 1, 1), (s + 2, 1)] if (s + 2) // store.phase_steps == s // store.phase_steps else []

  def batch_at(step):
    data = store.get(step, 1, ahead=steps_ahead(step))
    return cut(data, np.int32(step)) if store.place == 'device' else data

  result = _timed(batch_at, 3 * batch, args['seconds'], t0)
  s = store.schedule
  result |= {'place': store.place, 'read_gb': store.reader.bytes_read / 1e9, 'peak_rss_gb': _peak_rss_gb(),
             'epochs': result['steps'] / (s.segments_per_epoch * s.phase_steps),
             'window_gb': s.window_frames * features.n_mels * 2 / 1e9, 'segments_per_epoch': s.segments_per_epoch,
             'steps_per_segment': s.phase_steps, 'reader_busy_s': store.reader.read_seconds}
  store.close()
  out.put(result)


def _measure_packed(features_dir: str, args: dict, out) -> None:
  """In a fresh process: the packed host store (packing included in the time to the first batch)."""
  t0 = time.perf_counter()
  features, sampler = _split(features_dir, args)
  packed = input_pipeline.pack_timelines(features, sampler)
  parallel = DataParallel('jit', devices=jax.local_devices()[:1])
  loader = input_pipeline.HostTileLoader(packed, sampler, args['batch'], 1, put=parallel.put_host_batches)
  result = _timed(lambda s: loader.get(s, 1, ahead=[(s + 1, 1), (s + 2, 1)]), 3 * args['batch'], args['seconds'],
                  t0)
  result |= {'peak_rss_gb': _peak_rss_gb(), 'read_gb': packed.nbytes / 1e9}
  loader.close()
  out.put(result)


def _reporting(target, args, out) -> None:
  try:
    target(*args, out)
  except Exception as e:  # The parent prints it: one line with the setting and the fix.
    out.put({'error': f'{type(e).__name__}: {e}'})


def _in_fresh_process(target, *args) -> dict:
  context = multiprocessing.get_context('spawn')
  out = context.Queue()
  process = context.Process(target=_reporting, args=(target, args, out))
  process.start()
  result = out.get()
  process.join()
  if 'error' in result:
    raise SystemExit(f'bench input: {result["error"]}')
  return result


def stream_main(args) -> None:
  work = args.work_dir or tempfile.mkdtemp(prefix='dem_jax_bench_input_')
  made = None
  try:
    generate_s = 0.0
    if args.synthetic_hours:
      from dem_jax.benchmarks.synthetic_store import write_synthetic_store
      t0 = time.perf_counter()
      made = write_synthetic_store(os.path.join(work, 'synthetic_store'), args.synthetic_hours)
      generate_s = time.perf_counter() - t0
      features_dir = made
      print(f'{args.synthetic_hours:g} h synthetic store written in {generate_s:.1f} s', flush=True)
    else:
      features_dir = args.features_dir or sample_features(args.minutes, work)
    features, sampler = _split(features_dir, vars(args))
    store_gb = sampler.total_frames * features.n_mels * 2 / 1e9
    tile = [sampler.tile_frames, features.n_mels]
    print(f'{store_gb:.2f} GB of float16 frames in the training split; tiles of '
          f'{sampler.tile_frames} x {features.n_mels}, {args.batch} triplets per step', flush=True)
    del features, sampler
    settings = vars(args)
    stream = _in_fresh_process(_measure_stream, features_dir, settings)  # Where training would place it.
    places = {stream['place']: stream}
    if args.both_places:
      other = 'host' if stream['place'] == 'device' else 'device'
      places[other] = _in_fresh_process(_measure_stream, features_dir, settings | {'place': other})
    for result in places.values():
      print(f'stream ({result["place"]} window of {result["window_gb"]:.2f} GB): {result["tiles_per_s"]:.0f} '
            f'tiles/s, peak RSS {result["peak_rss_gb"]:.2f} GB, {result["read_gb"]:.2f} GB read over '
            f'{result["epochs"]:.2f} epochs, first batch after {result["first_batch_s"]:.1f} s', flush=True)
    packed = None
    if store_gb * 1e9 <= 0.5 * input_pipeline.host_memory_bytes():
      packed = _in_fresh_process(_measure_packed, features_dir, settings)
      print(f'packed host store: {packed["tiles_per_s"]:.0f} tiles/s, peak RSS {packed["peak_rss_gb"]:.2f} GB, '
            f'first batch after {packed["first_batch_s"]:.1f} s', flush=True)
    out = {
        'benchmark': 'input', 'store': 'stream', 'backend': jax.default_backend(), 'cpus': os.cpu_count(),
        'synthetic_hours': args.synthetic_hours, 'generate_seconds': round(generate_s, 1),
        'store_gb': round(store_gb, 3), 'resident_gb': args.resident_gb, 'tile': tile, 'batch_triplets': args.batch,
        'stream_place': stream['place'], 'stream_window_gb': round(stream['window_gb'], 3),
        'stream_segments_per_epoch': stream['segments_per_epoch'],
        'stream_steps_per_segment': stream['steps_per_segment'], 'stream_epochs': round(stream['epochs'], 2),
        'stream_read_gb': round(stream['read_gb'], 3), 'stream_reader_busy_s': round(stream['reader_busy_s'], 1),
        'stream_tiles_per_s_by_place': {k: round(v['tiles_per_s']) for k, v in places.items()},
        'stream_peak_rss_gb_by_place': {k: round(v['peak_rss_gb'], 3) for k, v in places.items()},
        'packed_tiles_per_s': round(packed['tiles_per_s']) if packed else None,
        'packed_peak_rss_gb': round(packed['peak_rss_gb'], 3) if packed else None,
        'packed_first_batch_s': round(packed['first_batch_s'], 2) if packed else None,
        'goals_met': {k: stream['tiles_per_s'] >= v for k, v in STREAM_GOALS.items()}
        | {'stream_peak_rss_below_half_the_store': stream['peak_rss_gb'] < 0.5 * store_gb},
        'stream_tiles_per_s': round(stream['tiles_per_s']), 'stream_peak_rss_gb': round(stream['peak_rss_gb'], 3),
        'stream_first_batch_s': round(stream['first_batch_s'], 2),
    }
    print(json.dumps(out))
  finally:
    if made:
      shutil.rmtree(made, ignore_errors=True)
    if not args.work_dir:
      shutil.rmtree(work, ignore_errors=True)
