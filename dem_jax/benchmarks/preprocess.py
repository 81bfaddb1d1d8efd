"""Preprocessing throughput, in audio-seconds per wall-second, three ways on the same generated audio:

- job:     our preprocessing job end to end (decode, resample when needed, log-Mel, zarr write, manifest), with
           --num_workers processes (default: the usable cores, as the command).
- librosa: what a user would write by hand: a per-file loop of librosa.load + librosa.feature.melspectrogram with
           the same parameters, one .npy per clip.
- floor:   the bare arithmetic on audio already in memory: numpy framing, rfft, magnitude, mel matmul, log, one
           process.

    dem-jax bench preprocess [--minutes=120] [--num_workers=N] [--data_dir=DIR]

The default is two hours of audio: a data set is hours to hundreds of hours, and on a few minutes the job's fixed
cost (starting its second worker process, about a second) would dominate what is measured.
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import librosa
import numpy as np

from dem_jax.configs import features as features_config
from dem_jax import audio
from dem_jax.frontend import FrontEnd, mel_matrix
from dem_jax.preprocess import job
from dem_jax.preprocess import sample_data


def librosa_loop(paths: list[str], out_dir: str, fe: FrontEnd) -> None:
  os.makedirs(out_dir, exist_ok=True)
  for i, path in enumerate(paths):
    y, _ = librosa.load(path, sr=fe.sample_rate, mono=True)
    mel = librosa.feature.melspectrogram(y=y, sr=fe.sample_rate, n_fft=fe.n_fft, hop_length=fe.hop_length,
                                         win_length=fe.win_length, center=False, power=1.0, n_mels=fe.n_mels,
                                         fmin=fe.fmin, fmax=fe.fmax, htk=fe.htk, norm=None)
    np.save(os.path.join(out_dir, f'{i:06d}.npy'), np.log(mel + fe.log_offset).T.astype(np.float16))


def numpy_floor(signals: list[np.ndarray], fe: FrontEnd) -> float:
  window = np.hanning(fe.win_length + 1)[:-1].astype(np.float32)
  mel = mel_matrix(fe)
  checksum = 0.0
  for y in signals:
    frames = np.lib.stride_tricks.sliding_window_view(y, fe.win_length)[::fe.hop_length]
    spec = np.abs(np.fft.rfft(frames * window, n=fe.n_fft))
    checksum += float(np.log(spec @ mel + fe.log_offset)[0, 0])
  return checksum


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog='bench preprocess')
  parser.add_argument('--minutes', type=float, default=120.0,
                      help='Audio to generate (DCASE layout, 4 channels).')
  parser.add_argument('--num_workers', type=int, default=job.usable_cores(),
                      help='job workers (default: the usable cores, as the command)')
  parser.add_argument('--data_dir', default=None, help='Use this DCASE-layout folder instead of generated audio.')
  parser.add_argument('--repeats', type=int, default=1, help='Time each method this many times; report the best.')
  args = parser.parse_args(argv)

  work = tempfile.mkdtemp(prefix='dem_jax_bench_')
  try:
    data_dir = args.data_dir
    if data_dir is None:
      data_dir = os.path.join(work, 'data')
      clips = max(1, int(np.ceil(args.minutes * 6)))  # 10-s clips.
      sessions = max(1, int(np.ceil(clips / (9 * 2 * 3))))
      sample_data.write_dcase2018_task5(data_dir, sessions_per_label=sessions, clips_per_session=3, nodes=2)
    plan_settings = job.settings_from_config(features_config.get_config(), 'dcase2018_task5', data_dir, None)
    fe = FrontEnd(**plan_settings['frontend'])
    paths = [os.path.join(data_dir, c['path']) for c in job.make_plan(plan_settings)['clips']]
    # Read every file once first, so that no method pays for a cold page cache (the job runs first).
    for path in paths:
      with open(path, 'rb') as f:
        f.read()
    seconds = sum(audio.audio_info(p).duration for p in paths)

    def best_of(fn):
      times = []
      for r in range(args.repeats):
        t0 = time.perf_counter()
        fn(r)
        times.append(time.perf_counter() - t0)
      return min(times)

    job_s = best_of(lambda r: job.run(features_config.get_config(), dataset='dcase2018_task5', data_dir=data_dir,
                                      output_dir=os.path.join(work, f'job{r}'), num_workers=args.num_workers))
    librosa_s = best_of(lambda r: librosa_loop(paths, os.path.join(work, f'npy{r}'), fe))
    signals = [audio.load_audio(p, fe.sample_rate) for p in paths]
    floor_s = best_of(lambda r: numpy_floor(signals, fe))

    rates = {'job': seconds / job_s, 'librosa_loop': seconds / librosa_s, 'numpy_floor': seconds / floor_s}
    for name, rate in rates.items():
      print(f'{name:>13}: {rate:8.1f} audio-s/s')
    result = {
        'audio_seconds': round(seconds, 1),
        'clips': len(paths),
        'num_workers': args.num_workers,
        'usable_cores': job.usable_cores(),
        'audio_s_per_s': {k: round(v, 1) for k, v in rates.items()},
        'job_over_librosa': round(rates['job'] / rates['librosa_loop'], 2),
        'job_over_floor': round(rates['job'] / rates['numpy_floor'], 2),
    }
    print(json.dumps(result))
  finally:
    shutil.rmtree(work, ignore_errors=True)
