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

import librosa
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


@functools.lru_cache(maxsize=8)
def mel_matrix(frontend: FrontEnd) -> np.ndarray:
  """[n_fft // 2 + 1, n_mels] float32 mel filterbank (librosa's, HTK scale by default)."""
  mel = librosa.filters.mel(sr=frontend.sample_rate, n_fft=frontend.n_fft, n_mels=frontend.n_mels,
                            fmin=frontend.fmin, fmax=frontend.fmax, htk=frontend.htk,
                            norm='slaney' if frontend.mel_norm == 'slaney' else None, dtype=np.float32)
  return np.ascontiguousarray(mel.T)


@functools.lru_cache(maxsize=8)
def _sparse_mel_t(frontend: FrontEnd) -> scipy.sparse.csr_matrix:
  # Each band spans a few FFT bins: about 1,000 of the 65,664 weights are non-zero, so a sparse product is ~10x
  # less work than the dense matmul.
  return scipy.sparse.csr_matrix(mel_matrix(frontend).T)


@functools.lru_cache(maxsize=8)
def _window(win_length: int) -> np.ndarray:
  return librosa.filters.get_window('hann', win_length, fftbins=True).astype(np.float32)


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
  # Windowed frames go straight into a zero-padded FFT buffer, which the FFT may overwrite: no padding copy.
  padded = np.zeros((min(block_frames, total), frontend.n_fft), dtype=np.float32)
  for start in range(0, total, block_frames):
    block = frames[start:start + block_frames]
    n = block.shape[0]
    np.multiply(block, window, out=padded[:n, :frontend.win_length])
    padded[:n, frontend.win_length:] = 0
    magnitude = np.abs(scipy.fft.rfft(padded[:n], axis=-1, overwrite_x=True))
    np.log((mel_t @ magnitude.T).T + frontend.log_offset, out=out[start:start + n])
  return out
