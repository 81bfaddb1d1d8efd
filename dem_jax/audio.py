"""Reading audio files: decode, average to mono, resample, optionally trim silence.

Errors that concern one file raise `AudioError` with the path and a reason a person can act on; callers that process
many files record it and go on.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import struct

import numpy as np
import soundfile
import soxr

# Extensions the folder reader and the embed command look for; libsndfile decodes all of them.
AUDIO_EXTENSIONS = ('.wav', '.flac', '.ogg', '.oga', '.opus', '.mp3', '.aif', '.aiff', '.au', '.w64')


class AudioError(Exception):
  """A file that cannot be turned into audio samples; `path` and `reason` say which and why."""

  def __init__(self, path: str, reason: str):
    super().__init__(f'{path}: {reason}')
    self.path = path
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class AudioInfo:
  sample_rate: int
  num_samples: int
  channels: int

  @property
  def duration(self) -> float:
    return self.num_samples / self.sample_rate if self.sample_rate else 0.0


def is_audio_file(path: str) -> bool:
  return os.path.splitext(path)[1].lower() in AUDIO_EXTENSIONS


def check_regular_file(path: str) -> None:
  """Raises AudioError unless `path` is a regular file: opening a FIFO or a device would block or never end."""
  try:
    mode = os.stat(path).st_mode
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise AudioError(path, 'a symbolic link loop (a link that leads back to itself); fix or remove it') from None
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
      raise AudioError(path, 'file not found; check the path, or remove the clip from the dataset lists') from None
    raise AudioError(path, f'cannot be read ({e.strerror}); fix its permissions') from None
  if not stat.S_ISREG(mode):
    kind = ('a folder' if stat.S_ISDIR(mode) else 'a FIFO (named pipe)' if stat.S_ISFIFO(mode) else
            'a device' if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 'a socket' if stat.S_ISSOCK(mode) else
            'not a regular file')
    raise AudioError(path, f'{kind}, not an audio file; skipped, never opened')


def audio_info(path: str) -> AudioInfo:
  """Header facts of an audio file (no decoding). Raises AudioError if the header cannot be read."""
  check_regular_file(path)
  try:
    info = soundfile.info(path)
  except Exception as e:  # libsndfile raises several types; all mean "not readable audio".
    raise AudioError(path, f'not a readable audio file ({e})') from None
  return AudioInfo(sample_rate=int(info.samplerate), num_samples=int(info.frames), channels=int(info.channels))


def max_resampled_length(num_samples: int, orig_rate: int, target_rate: int) -> int:
  """An upper bound on the length of `num_samples` samples resampled from orig_rate to target_rate."""
  if orig_rate == target_rate:
    return num_samples
  return -(-num_samples * target_rate // orig_rate) + 1


def wav_header_frames(path: str) -> int | None:
  """Frames (per channel) that a RIFF/WAVE file's `data` chunk header promises; None for other files.

  Read by hand because libsndfile clamps its frame count to what the file holds and mentions the difference only in
  its log; the header's own claim is what tells a truncated file from a short one.
  """
  try:
    with open(path, 'rb') as f:
      head = f.read(12)
      if len(head) < 12 or head[:4] != b'RIFF' or head[8:12] != b'WAVE':
        return None
      block_align = None
      while True:
        chunk = f.read(8)
        if len(chunk) < 8:
          return None
        chunk_id, size = chunk[:4], struct.unpack('<I', chunk[4:])[0]
        if chunk_id == b'fmt ':
          fmt = f.read(size + (size & 1))
          if len(fmt) < 14:
            return None
          block_align = struct.unpack('<H', fmt[12:14])[0]
        elif chunk_id == b'data':
          # 0xFFFFFFFF: a streaming writer that never knew the length; 0 block_align: a broken header.
          if not block_align or size == 0xFFFFFFFF:
            return None
          return size // block_align
        else:
          f.seek(size + (size & 1), os.SEEK_CUR)
  except OSError:
    return None


def channel_mean(data: np.ndarray, scale: float = 1.0) -> np.ndarray:
  """float32 [samples] mean of [samples, channels] `data` (float32, or integers to be multiplied by `scale`).

  A matrix-vector product, several times faster than mean(axis=1) on interleaved frames. `scale` is a power of two
  (int16 PCM: 2**-15), so folding it into the weights gives the same floats as scaling the samples first. Integer
  samples of a power-of-two number of channels (stereo, DCASE's four) are summed as integers and scaled once,
  faster still: every sum the product forms is exact in float32 then, so the floats are the same.
  """
  channels = data.shape[1]
  if channels == 1:
    return data[:, 0].astype(np.float32) * np.float32(scale) if scale != 1.0 else data[:, 0]
  if data.dtype == np.int16 and channels & (channels - 1) == 0:
    total = data[:, 0].astype(np.int32)
    for channel in range(1, channels):
      total += data[:, channel]
    mean = total.astype(np.float32)
    mean *= np.float32(scale / channels)
    return mean
  return data.astype(np.float32, copy=False) @ np.full(channels, np.float32(1 / channels) * np.float32(scale))


def trim_silence(samples: np.ndarray, top_db: float, *, frame_length: int = 2048, hop_length: int = 512
                 ) -> np.ndarray:
  """`samples` without their leading and trailing stretches quieter than the loudest frame by more than `top_db` dB.

  The rule, and the floats on the way, are librosa.effects.trim's (a test checks the cut, sample for sample): the
  RMS of frames of `frame_length` samples every `hop_length`, centred (zeros pad both ends); the cut starts at the
  first frame within `top_db` of the loudest and ends one hop after the last. Written here because librosa's effects
  module imports scipy.signal and numba, which would delay every preprocessing worker's first file.
  """
  half = frame_length // 2
  padded = np.pad(samples, (half, half))
  frames = np.lib.stride_tricks.sliding_window_view(padded, frame_length)[::hop_length].T  # [frame_length, n]
  rms = np.sqrt(np.mean(np.square(frames, dtype=np.float32), axis=0))
  amin = 1e-5 ** 2  # the floor below which powers count as equal (-100 dB)
  db = 10.0 * np.log10(np.maximum(amin, np.square(rms)))
  db -= 10.0 * np.log10(np.maximum(amin, np.max(rms) ** 2))
  loud = np.flatnonzero(db > -top_db)
  if loud.size == 0:
    return samples[:0]
  return samples[loud[0] * hop_length:min(samples.shape[0], (loud[-1] + 1) * hop_length)]


def read_audio(path: str, sample_rate: int, *, trim_top_db: float | None = None) -> tuple[np.ndarray, list[str]]:
  """`load_audio`, and warnings about the file worth recording (a header that promises more than the file holds)."""
  check_regular_file(path)
  try:
    with soundfile.SoundFile(path) as f:
      file_rate, file_format, stated_frames = f.samplerate, f.format, f.frames
      # 16-bit PCM is read as integers and scaled here: libsndfile's own float conversion costs more than the decode
      # (docs/benchmarks.md).
      # int16 / 32768 is exactly the float32 it would give.
      pcm16 = f.subtype == 'PCM_16'
      data = f.read(dtype='int16' if pcm16 else 'float32', always_2d=True)
  except Exception as e:
    raise AudioError(path, f'cannot decode audio ({e}); is it a complete, supported audio file?') from None
  if data.shape[0] == 0:
    raise AudioError(path, 'the file holds no audio samples (empty or truncated)')
  warnings = []
  # Lengths the header states exactly: WAV's data chunk, FLAC's stream info (MP3 and Ogg only estimate theirs).
  promised = wav_header_frames(path) or (stated_frames if file_format == 'FLAC' else 0)
  if promised > data.shape[0]:
    warnings.append(f'truncated: the header promises {promised} samples per channel, the file holds '
                    f'{data.shape[0]}; kept the {data.shape[0]} read')
  samples = channel_mean(data, scale=2.0**-15 if pcm16 else 1.0)
  if not pcm16 and not np.all(np.isfinite(samples)):
    raise AudioError(path, 'the audio holds NaN or infinite samples')
  if file_rate != sample_rate:
    samples = soxr.resample(samples, file_rate, sample_rate, quality='HQ').astype(np.float32, copy=False)
    if not np.all(np.isfinite(samples)):  # Samples near the float32 limit can overflow in the filter.
      raise AudioError(path, 'resampling overflowed: the samples are far outside [-1, 1]')
  if trim_top_db is not None and np.any(samples):
    samples = trim_silence(samples, trim_top_db)
  return np.ascontiguousarray(samples, dtype=np.float32), warnings


def load_audio(path: str, sample_rate: int, *, trim_top_db: float | None = None) -> np.ndarray:
  """Mono float32 samples of `path` at `sample_rate`.

  Multi-channel audio is averaged to mono (DCASE's 4 microphones, stereo music). Other sample rates are resampled
  with soxr (high quality). With `trim_top_db`, leading and trailing parts quieter than the peak by that many dB
  are cut (`trim_silence`, librosa.effects.trim's rule), as the original did for music. Samples are finite, but
  not necessarily in [-1, 1] (float files may hold any value): callers check what they compute from them.
  """
  return read_audio(path, sample_rate, trim_top_db=trim_top_db)[0]
