r"""Small, seeded, synthetic data sets in exactly the real on-disk layouts, for the demo and the tests.

  dem-jax sample_data --layout=dcase2018_task5 --out=/tmp/sample_dcase
  dem-jax sample_data --layout=folder --out=/tmp/sample_music

dcase2018_task5: `audio/DevNode<k>_ex<session>_<segment>.wav` (10 s, 16 kHz, 4 channels, 16-bit), `meta.txt`
(tab-separated name, label, session; no final newline, as in the real set) and `evaluation_setup/fold{1..4}_
{train,evaluate,test}.txt`. Every session is one continuous recording cut into consecutive 10-s clips, heard by
every node with its own gain and noise; a fold keeps a session and all its nodes together. Each activity sounds
different (motor hum for vacuum_cleaner, clinks for dishwashing, babble for social_activity, near-silence for
absence, ...) and each session draws its own parameters (pitch, rates), so time-near tiles share more than tiles of
different sessions: what the triplet objective learns from.

folder: `<root>/<genre>/<song>.<wav|flac|ogg>`, stereo at 22.05 or 44.1 kHz (so resampling runs), with a second of
silence before and after each song (so trimming runs).
"""

from __future__ import annotations

import os

import numpy as np
import scipy.signal
import soundfile

from dem_jax.datasets import DCASE_LABELS

SR = 16000
CLIP_SECONDS = 10


def _noise(rng, n, color=0.0):
  """Gaussian noise; color < 0 darkens it (one-pole low-pass), color > 0 brightens it (the high-pass rest)."""
  x = rng.standard_normal(n).astype(np.float32)
  if color:
    a = min(abs(color), 0.99)
    low = scipy.signal.lfilter([1 - a], [1, -a], x).astype(np.float32)
    x = low if color < 0 else x - low
  return x


def _events(rng, n, rate_hz, make_event):
  """Sum of events at Poisson times: make_event(rng) -> short waveform."""
  out = np.zeros(n, np.float32)
  count = rng.poisson(rate_hz * n / SR)
  for t in rng.integers(0, n, size=count):
    ev = make_event(rng)
    end = min(n, t + len(ev))
    out[t:end] += ev[:end - t]
  return out


def _decay_tone(freq, seconds, decay, sr=SR):
  t = np.arange(int(seconds * sr)) / sr
  return (np.sin(2 * np.pi * freq * t) * np.exp(-t * decay)).astype(np.float32)


def _harmonics(f0, t, num, tilt=1.0, jitter=None):
  phase = 2 * np.pi * np.cumsum(f0 * (1 + (jitter if jitter is not None else 0))) / SR
  return sum((np.sin(k * phase) / k ** tilt) for k in range(1, num + 1)).astype(np.float32)


def _babble(rng, n, voices, f0_range):
  t = np.arange(n) / SR
  out = np.zeros(n, np.float32)
  for _ in range(voices):
    f0 = rng.uniform(*f0_range)
    wobble = 0.05 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t + rng.uniform(0, 6))
    voice = _harmonics(f0, t, 12, tilt=1.2, jitter=wobble)
    syllables = (np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6)) > rng.uniform(-0.2, 0.4))
    pauses = np.repeat(rng.random(n // SR + 1) > 0.3, SR)[:n]
    out += voice * syllables * pauses
  return out / max(voices, 1)


def activity_sound(label: str, rng: np.random.Generator, n: int) -> np.ndarray:
  """A continuous mono recording of `n` samples of one activity; rng carries the session's own character."""
  t = np.arange(n) / SR
  if label == 'absence':
    x = 0.003 * _noise(rng, n, -0.9) + 0.02 * _events(rng, n, 0.05, lambda r: _decay_tone(r.uniform(300, 900), 0.2, 30))
  elif label == 'cooking':
    sizzle = _noise(rng, n, 0.5) * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.1, 0.4) * t))
    clank = _events(rng, n, rng.uniform(0.2, 0.6), lambda r: _decay_tone(r.uniform(400, 1200), 0.4, 12))
    x = 0.05 * sizzle + 0.2 * clank
  elif label == 'dishwashing':
    water = _noise(rng, n, 0.3) * 0.04
    clinks = _events(rng, n, rng.uniform(2, 5), lambda r: _decay_tone(r.uniform(2500, 5000), 0.15, 40))
    x = water + 0.25 * clinks
  elif label == 'eating':
    clicks = _events(rng, n, rng.uniform(0.8, 2), lambda r: _decay_tone(r.uniform(1500, 3000), 0.05, 120))
    x = 0.15 * clicks + 0.15 * _babble(rng, n, 1, (100, 140)) + 0.004 * _noise(rng, n, -0.8)
  elif label == 'other':
    f = rng.uniform(200, 2000) * (1 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.05, 0.2) * t))
    x = 0.08 * np.sin(2 * np.pi * np.cumsum(f) / SR) + 0.01 * _noise(rng, n)
  elif label == 'social_activity':
    x = 0.3 * _babble(rng, n, int(rng.integers(3, 6)), (90, 260)) + 0.005 * _noise(rng, n, -0.5)
  elif label == 'vacuum_cleaner':
    f0 = rng.uniform(110, 190)
    hum = _harmonics(f0, t, 20, tilt=0.7, jitter=0.01 * np.sin(2 * np.pi * 0.3 * t))
    x = 0.08 * hum + 0.12 * _noise(rng, n, 0.2)
  elif label == 'watching_tv':
    root = rng.uniform(110, 220)
    chord_steps = rng.choice([0, 3, 4, 5, 7, 9], size=n // (2 * SR) + 1)
    f = np.repeat(root * 2 ** (chord_steps / 12), 2 * SR)[:n]
    music = sum(np.sin(2 * np.pi * np.cumsum(f * r) / SR) for r in (1, 1.26, 1.5)) / 3
    x = 0.08 * music + 0.15 * _babble(rng, n, 1, (100, 220)) + 0.005 * _noise(rng, n)
  elif label == 'working':
    keys = _events(rng, n, rng.uniform(3, 7), lambda r: _noise(r, int(0.01 * SR)) * np.hanning(int(0.01 * SR)))
    fan = np.sin(2 * np.pi * rng.uniform(50, 70) * t)
    x = 0.15 * keys + 0.01 * fan + 0.004 * _noise(rng, n, -0.9)
  else:
    raise ValueError(f'No synthetic sound for label {label!r}.')
  return np.asarray(x, np.float32)


def write_dcase2018_task5(out: str, *, sessions_per_label: int = 4, clips_per_session: int = 3, nodes: int = 2,
                          labels=DCASE_LABELS, seed: int = 0) -> list[str]:
  """Writes a DCASE 2018 task 5 development set; returns the clip names (audio/<name>.wav)."""
  os.makedirs(os.path.join(out, 'audio'), exist_ok=True)
  os.makedirs(os.path.join(out, 'evaluation_setup'), exist_ok=True)
  rng = np.random.default_rng(seed)
  rows, fold_rows = [], {k: [] for k in range(1, 5)}
  session_number = 0
  for label in labels:
    for s in range(sessions_per_label):
      session_number += 1
      session = f'{label}_{s}'
      fold = s % 4 + 1
      n = clips_per_session * CLIP_SECONDS * SR
      source = activity_sound(label, np.random.default_rng(rng.integers(1 << 32)), n)
      for node in range(1, nodes + 1):
        node_rng = np.random.default_rng(rng.integers(1 << 32))
        gain = node_rng.uniform(0.5, 1.0)
        for segment in range(1, clips_per_session + 1):
          part = source[(segment - 1) * CLIP_SECONDS * SR:segment * CLIP_SECONDS * SR] * gain
          channels = [part * node_rng.uniform(0.9, 1.1) + 0.001 * node_rng.standard_normal(part.shape[0])
                      for _ in range(4)]
          wav = np.clip(np.stack(channels, axis=1), -1, 1)
          name = f'audio/DevNode{node}_ex{session_number}_{segment}.wav'
          soundfile.write(os.path.join(out, name), wav, SR, subtype='PCM_16')
          rows.append((name, label, session))
          fold_rows[fold].append((name, label, session))
  with open(os.path.join(out, 'meta.txt'), 'w') as f:
    f.write('\n'.join('\t'.join(r) for r in rows))  # The real meta.txt lacks a final newline.
  for k in range(1, 5):
    train = [r for j in range(1, 5) if j != k for r in fold_rows[j]]
    setup = os.path.join(out, 'evaluation_setup')
    with open(os.path.join(setup, f'fold{k}_train.txt'), 'w') as f:
      f.writelines('\t'.join(r) + '\n' for r in train)
    with open(os.path.join(setup, f'fold{k}_evaluate.txt'), 'w') as f:
      f.writelines('\t'.join(r) + '\n' for r in fold_rows[k])
    with open(os.path.join(setup, f'fold{k}_test.txt'), 'w') as f:
      f.writelines(r[0] + '\n' for r in fold_rows[k])
  return [r[0] for r in rows]


GENRES = ('ambient', 'drum_and_bass', 'house', 'techno')


def genre_sound(genre: str, rng: np.random.Generator, sr: int, seconds: float) -> np.ndarray:
  n = int(seconds * sr)
  t = np.arange(n) / sr

  def beat_events(bpm, make, swing=0.0):
    out = np.zeros(n, np.float32)
    period = 60.0 / bpm
    for k, start in enumerate(np.arange(0, seconds, period)):
      i = int((start + (swing * period if k % 2 else 0)) * sr)
      ev = make()
      end = min(n, i + len(ev))
      if i < n:
        out[i:end] += ev[:end - i]
    return out

  def kick():
    tt = np.arange(int(0.25 * sr)) / sr
    return np.sin(2 * np.pi * (50 + 100 * np.exp(-tt * 30)) * tt) * np.exp(-tt * 12)

  def hat():
    m = int(0.04 * sr)
    return rng.standard_normal(m) * np.exp(-np.arange(m) / (0.008 * sr)) * 0.3

  key = rng.uniform(80, 160)
  if genre == 'ambient':
    pads = sum(np.sin(2 * np.pi * key * r * t + rng.uniform(0, 6)) for r in (1, 1.5, 2, 2.5))
    x = 0.1 * pads * (0.6 + 0.4 * np.sin(2 * np.pi * 0.05 * t)) + 0.01 * rng.standard_normal(n)
  elif genre == 'techno':
    bpm = rng.uniform(128, 136)
    x = 0.5 * beat_events(bpm, kick) + 0.3 * beat_events(bpm * 2, hat, swing=0.5)
    x += 0.1 * np.sign(np.sin(2 * np.pi * key / 2 * t)) * (np.sin(2 * np.pi * bpm / 60 * t) > 0)
  elif genre == 'house':
    bpm = rng.uniform(120, 126)
    x = 0.4 * beat_events(bpm, kick) + 0.2 * beat_events(bpm, hat, swing=0.5)
    chord = sum(np.sin(2 * np.pi * key * 2 * r * t) for r in (1, 1.26, 1.5)) / 3
    x += 0.15 * chord * (np.sin(2 * np.pi * bpm / 120 * t) > 0.3)
  elif genre == 'drum_and_bass':
    bpm = rng.uniform(170, 176)
    x = 0.4 * beat_events(bpm / 2, kick) + 0.3 * beat_events(bpm * 2, hat)
    x += 0.2 * np.sin(2 * np.pi * key / 2 * t * (1 + 0.02 * np.sin(2 * np.pi * 0.5 * t)))
  else:
    raise ValueError(f'No synthetic sound for genre {genre!r}.')
  return np.asarray(x, np.float32)


def write_folder(out: str, *, songs_per_genre: int = 6, seconds: float = 20.0, genres=GENRES, seed: int = 0
                 ) -> list[str]:
  """Writes `<out>/<genre>/<song>.<ext>`; returns the relative paths."""
  rng = np.random.default_rng(seed)
  paths = []
  formats = [('wav', 'PCM_16', 22050), ('flac', 'PCM_16', 44100), ('ogg', 'VORBIS', 22050)]
  for genre in genres:
    os.makedirs(os.path.join(out, genre), exist_ok=True)
    for s in range(songs_per_genre):
      ext, subtype, sr = formats[s % len(formats)]
      song = genre_sound(genre, np.random.default_rng(rng.integers(1 << 32)), sr, seconds)
      silence = np.zeros(sr, np.float32)
      mono = np.concatenate([silence, np.clip(song, -1, 1), silence])
      stereo = np.stack([mono, mono * 0.9], axis=1)
      rel = os.path.join(genre, f'{genre}_{s:02d}.{ext}')
      soundfile.write(os.path.join(out, rel), stereo, sr, subtype=subtype)
      paths.append(rel)
  return paths
