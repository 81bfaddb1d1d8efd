"""The log-Mel front end: audio samples -> [frames, mel bands] float32.

Defaults are the original system's: a 480-sample (30 ms) periodic Hann window every 160 samples (10 ms), each frame
zero-padded to a 1024-point FFT, magnitude spectrum, 128 HTK mel bands from 50 Hz to 8 kHz, natural log(x + 1e-6).
Frames start at sample 0 and only whole windows count (no centring), so a 5-s tile at 16 kHz is 498 frames.

Written with numpy rather than librosa.stft because librosa frames the signal with n_fft samples (1024) and centres
the shorter window in them, which changes the frame count (494 vs 498 per 5 s); the magnitudes are the same, as the
golden test shows. The arithmetic runs in float32 in blocks of 256 frames (1 MiB of FFT input), small enough to stay
in a core's cache; long files never allocate the whole spectrogram.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import scipy.fft
import scipy.sparse


@dataclasses.dataclass(frozen=True)
class FrontEnd:
  """Log-Mel parameters. Build from a config with `FrontEnd.from_config(config.frontend)`."""
  sample_rate: int = 16000
  win_length: int = 480
  hop_length: int = 160
  n_fft: int = 1024
  n_mels: int = 128
  fmin: float = 50.0
  fmax: float = 8000.0
  htk: bool = True
  mel_norm: str = ''  # '': triangles peak at 1, as the original; 'slaney': librosa's area normalisation.
  log_offset: float = 1e-6

  def __post_init__(self):
    for name in ('sample_rate', 'win_length', 'hop_length', 'n_fft', 'n_mels'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'frontend.{name}={value!r}; it must be a whole number of 1 or more.')
    for name in ('fmin', 'fmax', 'log_offset'):
      if not math.isfinite(getattr(self, name)):
        raise ValueError(f'frontend.{name}={getattr(self, name)!r}; it must be a finite number.')
    if self.log_offset <= 0:
      raise ValueError(f'frontend.log_offset={self.log_offset!r}; log(x + offset) needs an offset above 0.')
    if self.win_length > self.n_fft:
      raise ValueError(f'frontend.win_length ({self.win_length}) must not exceed frontend.n_fft ({self.n_fft}).')
    if self.fmax > self.sample_rate / 2:
      raise ValueError(f'frontend.fmax ({self.fmax}) is above the Nyquist frequency of '
                       f'frontend.sample_rate={self.sample_rate}; lower fmax or raise the sample rate.')
    if self.mel_norm not in ('', 'slaney'):
      raise ValueError(f"frontend.mel_norm={self.mel_norm!r}; choose '' (peak 1, the original's) or 'slaney'.")
    if not 0 <= self.fmin < self.fmax:
      raise ValueError(f'frontend.fmin ({self.fmin}) must lie in [0, fmax={self.fmax}).')

  @classmethod
  def from_config(cls, config) -> 'FrontEnd':
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(config).items() if k in fields}
    unknown = set(dict(config)) - fields
    if unknown:
      raise ValueError(f'Unknown frontend settings {sorted(unknown)}; known: {sorted(fields)}.')
    return cls(**values)

  @property
  def frame_rate(self) -> float:
    """Frames per second."""
    return self.sample_rate / self.hop_length

  def num_frames(self, num_samples: int) -> int:
    """Frames that `log_mel` returns for a signal of `num_samples` samples."""
    if num_samples < self.win_length:
      return 0
    return 1 + (num_samples - self.win_length) // self.hop_length

  def frames_for_seconds(self, seconds: float) -> int:
    """Frames of a stretch of audio `seconds` long (5 s -> 498 with the defaults)."""
    return self.num_frames(int(round(seconds * self.sample_rate)))


def _hz_to_mel(hz, htk: bool = True):
  """Mel of frequencies in Hz: HTK's 2595 log10(1 + f / 700), or Slaney's scale (linear to 1 kHz, then log)."""
  hz = np.asarray(hz, dtype=np.float64)
  if htk:
    return 2595.0 * np.log10(1.0 + hz / 700.0)
  linear = hz / _SLANEY_HZ_PER_MEL
  return np.where(hz >= _SLANEY_LOG_HZ, _SLANEY_LOG_MEL + np.log(np.maximum(hz, _SLANEY_LOG_HZ) / _SLANEY_LOG_HZ)
                  / _SLANEY_LOG_STEP, linear)


def _mel_to_hz(mel, htk: bool = True):
  """Inverse of `_hz_to_mel`."""
  mel = np.asarray(mel, dtype=np.float64)
  if htk:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
  return np.where(mel >= _SLANEY_LOG_MEL, _SLANEY_LOG_HZ * np.exp(_SLANEY_LOG_STEP * (mel - _SLANEY_LOG_MEL)),
                  _SLANEY_HZ_PER_MEL * mel)


# Slaney's mel scale (the Auditory Toolbox's): 200/3 Hz per mel up to 1 kHz, then 27 mels per factor 6.4.
_SLANEY_HZ_PER_MEL = 200.0 / 3
_SLANEY_LOG_HZ = 1000.0
_SLANEY_LOG_MEL = _SLANEY_LOG_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOG_STEP = np.log(6.4) / 27.0


@functools.lru_cache(maxsize=8)
def mel_matrix(frontend: FrontEnd) -> np.ndarray:
  """[n_fft // 2 + 1, n_mels] float32 mel filterbank: triangles on the FFT bins between n_mels + 2 points evenly
  spaced in mel from fmin to fmax, each peaking at 1 on its centre (or with `mel_norm='slaney'`, scaled by
  2 / (upper edge - lower edge) in Hz, to an area of 1).

  The same floats as librosa.filters.mel with these settings (a test checks), computed here because librosa's
  filters module imports scipy.signal and numba, which would delay every process's first log-Mel
  (docs/benchmarks.md has the figures).
  """
  mel_range = _hz_to_mel(frontend.fmin, frontend.htk), _hz_to_mel(frontend.fmax, frontend.htk)
  edges_hz = _mel_to_hz(np.linspace(*mel_range, frontend.n_mels + 2), frontend.htk)
  bins_hz = np.fft.rfftfreq(frontend.n_fft, d=1.0 / frontend.sample_rate)
  width = np.diff(edges_hz)
  from_edge = edges_hz[:, None] - bins_hz[None, :]  # [n_mels + 2, bins]: each point's distance above each bin
  rising = -from_edge[:-2] / width[:-1, None]
  falling = from_edge[2:] / width[1:, None]
  weights = np.maximum(0, np.minimum(rising, falling)).astype(np.float32)
  if frontend.mel_norm == 'slaney':
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]  # in float64, rounded to float32 once
  return np.ascontiguousarray(weights.T)


@functools.lru_cache(maxsize=8)
def _sparse_mel_t(frontend: FrontEnd) -> scipy.sparse.csr_matrix:
  # Each band spans a few FFT bins: about 1,000 of the 65,664 weights are non-zero, so a sparse product is ~10x
  # less work than the dense matmul.
  return scipy.sparse.csr_matrix(mel_matrix(frontend).T)


@functools.lru_cache(maxsize=8)
def _window(win_length: int) -> np.ndarray:
  """The periodic Hann window of `win_length` samples, float32 (scipy.signal.get_window('hann', n)'s floats)."""
  phase = np.linspace(-np.pi, np.pi, win_length + 1)[:-1]
  return (0.5 + 0.5 * np.cos(phase)).astype(np.float32)


def log_mel(samples: np.ndarray, frontend: FrontEnd, *, block_frames: int = 256) -> np.ndarray:
  """Log-Mel spectrogram of mono `samples` at `frontend.sample_rate`: float32 [frames, n_mels]."""
  samples = np.asarray(samples, dtype=np.float32)
  if samples.ndim != 1:
    raise ValueError(f'log_mel takes mono audio, got shape {samples.shape}.')
  total = frontend.num_frames(samples.shape[0])
  out = np.empty((total, frontend.n_mels), dtype=np.float32)
  if total == 0:
    return out
  frames = np.lib.stride_tricks.sliding_window_view(samples, frontend.win_length)[::frontend.hop_length]
  window, mel_t = _window(frontend.win_length), _sparse_mel_t(frontend)
  # Windowed frames go straight into a zero-padded FFT buffer: no padding copy. The real FFT leaves its input as
  # it is, so the padding is written once.
  padded = np.zeros((min(block_frames, total), frontend.n_fft), dtype=np.float32)
  for start in range(0, total, block_frames):
    block = frames[start:start + block_frames]
    n = block.shape[0]
    np.multiply(block, window, out=padded[:n, :frontend.win_length])
    magnitude = np.abs(scipy.fft.rfft(padded[:n], axis=-1))
    np.log((mel_t @ magnitude.T).T + frontend.log_offset, out=out[start:start + n])
  return out
