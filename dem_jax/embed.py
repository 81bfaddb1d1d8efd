r"""Embeddings from a trained workdir: of feature-store clips, of audio files of any length, of raw tiles.

    from dem_jax.embed import Embedder
    embedder = Embedder('/scratch/dcase_run')              # latest checkpoint; Embedder(w, step=N) for another
    out = embedder.embed_file('kitchen.wav')   # {'embeddings': [n, E], 'timestamps': [n], 'clip_embedding': [E]}
    out = embedder.embed_audio(samples, 44100)            # in-memory audio: any rate, [samples] or [samples, channels]
    out = embedder.embed_file('kitchen.wav', trunk=True)  # also 'trunk': [n, C] (the head's input), 'clip_trunk'
    table = embedder.embed_features(open_features('/data/features/dcase_dev'))

Tiles are cut every `hop_seconds` (default: the tile length in seconds, the original's non-overlapping grid); a tile's
timestamp is its start in seconds, `centre_timestamps` its centre. Where the grid stops short of the end of the
audio, one more tile is aligned to its end (overlapping the one before), so the last seconds are always embedded;
its timestamp is its own start, off the grid. Audio shorter than one tile is padded with silence to one tile. The
pooled clip embedding is the mean of the tile embeddings, L2-normalised again. Audio whose log-Mel is not finite
raises `EmbedError` rather than giving an embedding of garbage.

In-memory audio is [samples] or [samples, channels], the layout soundfile.read returns (the channels are averaged);
a 2-D array with more channels than samples is [channels, samples] (torchaudio's and librosa's layout) and is
refused: pass its transpose. Float samples are taken as they are (full scale 1.0); integer PCM (what
scipy.io.wavfile.read returns) is scaled as soundfile scales it when it reads a file as float: int16 / 2**15,
int32 / 2**31, int8 / 2**7, uint8 (x - 128) / 2**7.

Two representations, one name each: 'embedding' is the model's output (arrays of them 'embeddings'), 'trunk' the
pooled features of its trunk's last block, the head's input.

Command line: embed a file or a folder (recursively), one `<file name>.npz` per input (`x.wav` -> `x.wav.npz`, so
`x.wav` and `x.flac` of one folder stay apart) holding embeddings, timestamps, centre_timestamps, clip_embedding,
and the settings they were made with (workdir, checkpoint_step, tile_seconds, hop_seconds, representations):

    dem-jax embed --workdir=W --input=FILE_OR_DIR --output_dir=O

Tiles of many files are packed into full batches of `--batch_size` while worker threads decode the next files.
A file whose output exists with the same settings is skipped unless `--overwrite`, so a stopped run finishes what
is left; an output made with other settings (another workdir, step or hop, with or without the trunk), or by a
version that did not record them, is embedded again, so one folder never mixes two settings. `--trunk` also writes
each tile's pooled trunk features (`trunk`, the head's input: the representation the `:cpu` recipe is tuned for)
and their mean (`clip_trunk`). A file that cannot be embedded is reported and skipped; embed_summary.json in O lists
what was written (and which of those replaced an output of other settings), already there and skipped.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import concurrent.futures
import dataclasses
import errno
import itertools
import json
import logging
import math
import os
import re
import tempfile
import zipfile
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import soxr
import threadpoolctl
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dem_jax import audio
from dem_jax import checkpoint as checkpoint_lib
from dem_jax import log_util
from dem_jax import models
from dem_jax.features import Clip, Features
from dem_jax.frontend import FrontEnd, log_mel


class EmbedError(ValueError):
  """Audio or a setting that cannot give a trustworthy embedding; the message says why and what to do."""


def tile_starts(num_frames: int, tile_frames: int, hop_frames: int, *, cover_end: bool = False) -> np.ndarray:
  """Start frames of the tiles cut from a clip: every hop while a whole tile fits; one tile if none fits.

  With `cover_end`, one more tile aligned to the clip's last frame when the grid stops short of it, so that the
  last seconds of a file are embedded too (a whole tile of real audio, overlapping its predecessor, rather than a
  tile padded with silence).
  """
  if num_frames <= tile_frames:
    return np.zeros(1, dtype=np.int64)
  starts = np.arange(0, num_frames - tile_frames + 1, hop_frames, dtype=np.int64)
  if cover_end and starts[-1] + tile_frames < num_frames:
    starts = np.append(starts, num_frames - tile_frames)
  return starts


def pad_to_tile(frames: np.ndarray, tile_frames: int, fill: float) -> np.ndarray:
  if frames.shape[0] >= tile_frames:
    return frames
  pad = np.full((tile_frames - frames.shape[0], frames.shape[1]), fill, dtype=frames.dtype)
  return np.concatenate([frames, pad])


def cut_tiles(frames: np.ndarray, tile_frames: int, hop_frames: int, fill: float, *, cover_end: bool = False
              ) -> tuple[np.ndarray, np.ndarray]:
  """([n, T, M] tiles, [n] start frames) of one clip: padded with `fill` to one tile if shorter, then every hop
  (and the end; see `tile_starts`)."""
  frames = pad_to_tile(frames, tile_frames, fill)
  starts = tile_starts(frames.shape[0], tile_frames, hop_frames, cover_end=cover_end)
  return np.stack([frames[s:s + tile_frames] for s in starts]), starts


def _check_log_mel(frames: np.ndarray) -> None:
  if not np.all(np.isfinite(frames)):
    raise EmbedError('the log-Mel spectrogram holds NaN or infinite values (overflowing or corrupt samples); '
                     'check the audio')


@dataclasses.dataclass
class _FileTiles:
  """One file on its way through `Embedder.embed_files`: its frames and tile starts, then its embeddings."""
  path: str
  frames: np.ndarray | None = None
  starts: np.ndarray | None = None
  error: audio.AudioError | None = None
  embeddings: list = dataclasses.field(default_factory=list)
  trunk: list = dataclasses.field(default_factory=list)  # trunk=True: each tile's pooled trunk features
  missing: int = 0  # tiles whose embedding has not come back yet


def _map_ahead(pool: concurrent.futures.Executor, fn: Callable[[Any], Any], items: Iterable, *, ahead: int
               ) -> Iterator:
  """fn(item) for each item, in order, computed by `pool` at most `ahead` items in advance (a bounded queue, unlike
  Executor.map, which submits everything at once)."""
  items = iter(items)
  futures = collections.deque(pool.submit(fn, item) for item in itertools.islice(items, ahead))
  while futures:
    result = futures.popleft().result()
    for item in itertools.islice(items, 1):
      futures.append(pool.submit(fn, item))
    yield result


def l2_normalise(x: np.ndarray, axis: int = -1) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def last_block_name(model) -> str:
  """The name of the trunk's last residual block, whose output the model pools before its head."""
  return f'stage{len(model.stage_sizes)}_block{model.stage_sizes[-1]}'


def apply_with_trunk(model, variables: dict, tiles):
  """(the model's output, its trunk's last block [N, T', M', C]) of one forward pass outside training."""
  last_block = last_block_name(model)
  output, state = model.apply(variables, tiles, train=False, mutable=['intermediates'],
                              capture_intermediates=lambda module, _: module.name == last_block)
  (trunk,) = state['intermediates'][last_block]['__call__']
  return output, trunk


def forward_with_trunk(model, variables: dict, tiles) -> dict:
  """{'embedding': [N, E], 'trunk': [N, C]} of one forward pass: the model's output, and its trunk's last block
  pooled as the model pools it before the head (a float32 mean over time and bands; dropout is off outside
  training, so this is exactly the head's input)."""
  embedding, trunk = apply_with_trunk(model, variables, tiles)
  return {'embedding': embedding, 'trunk': jnp.mean(trunk.astype(jnp.float32), axis=(1, 2))}


class TileEmbedder:
  """A jit-compiled forward pass over fixed-size batches, data-parallel over all local devices.

  The batch shape never changes (the last batch is padded), so it compiles once. Calling it gives the embeddings;
  with `trunk=True`, the embeddings and the pooled trunk features of the same pass.
  """

  def __init__(self, model, variables: dict, *, batch_size: int = 64):
    devices = jax.local_devices()
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    mesh = Mesh(np.array(devices), ('data',))
    self._batch_sharding = NamedSharding(mesh, P('data'))
    self._replicated = NamedSharding(mesh, P())
    self.set_variables(variables)
    shardings = {'in_shardings': (self._replicated, self._batch_sharding), 'out_shardings': self._batch_sharding}
    self._forward = jax.jit(lambda v, x: model.apply(v, x, train=False), **shardings)
    self._forward_with_trunk = jax.jit(functools.partial(forward_with_trunk, model), **shardings)

  @property
  def variables(self) -> dict:
    """The weights, replicated on every local device."""
    return self._variables

  def set_variables(self, variables: dict) -> None:
    """New weights of the same shapes (no recompilation)."""
    self._variables = jax.device_put(variables, self._replicated)

  def dispatch(self, batch: np.ndarray, *, trunk: bool = False):
    """Starts the forward pass of one full float32 batch [batch_size, T, M]; returns at once (the result is [B, E],
    or with `trunk` the dict of `forward_with_trunk`, once computed). The caller must not change `batch` before
    reading the result: the CPU may share its memory."""
    forward = self._forward_with_trunk if trunk else self._forward
    return forward(self._variables, jax.device_put(batch, self._batch_sharding))

  def __call__(self, tiles: np.ndarray, *, trunk: bool = False):
    """[N, T, M] -> float32 [N, E]; with `trunk`, {'embedding': float32 [N, E], 'trunk': float32 [N, C]} of one
    pass (see `forward_with_trunk`)."""
    return self._batched(self._forward_with_trunk if trunk else self._forward, tiles)

  def _batched(self, forward, tiles: np.ndarray):
    n = tiles.shape[0]
    out = []
    for start in range(0, n, self.batch_size):
      chunk = np.asarray(tiles[start:start + self.batch_size], dtype=np.float32)
      if chunk.shape[0] < self.batch_size:
        chunk = np.concatenate([chunk, np.zeros((self.batch_size - chunk.shape[0],) + chunk.shape[1:], np.float32)])
      out.append(forward(self._variables, jax.device_put(chunk, self._batch_sharding)))
    if not out:  # No tiles: empty outputs of the right widths.
      batch = jax.ShapeDtypeStruct((self.batch_size,) + tuple(tiles.shape[1:]), np.float32)
      return jax.tree.map(lambda s: np.zeros((0,) + s.shape[1:], np.float32),
                          jax.eval_shape(forward, self._variables, batch))
    return jax.tree.map(lambda *parts: np.concatenate([np.asarray(p) for p in parts])[:n], *out)


@contextlib.contextmanager
def _quiet_checkpoint_reading():
  """Holds back what orbax logs (through absl) while a checkpoint is opened: its INFO lines, and its notice that a
  read-only manager is read-only, our own choice restated as a WARNING that a notebook prints. The filter is the
  command lines' (log_util), on the 'absl' logger for this block only: the user's own logging is untouched, and
  library warnings still show."""
  absl_logger = logging.getLogger('absl')
  drop = log_util._DropLibraryInfo()
  absl_logger.addFilter(drop)
  try:
    yield
  finally:
    absl_logger.removeFilter(drop)


def check_hop_seconds(hop_seconds: float | None, name: str, unset: str) -> None:
  """EmbedError naming `name` unless the hop is None (`unset`: the tile length) or a positive finite number."""
  if hop_seconds is not None and not (math.isfinite(hop_seconds) and hop_seconds > 0):
    raise EmbedError(f'{name}={hop_seconds}; give a positive number of seconds between tile starts ({unset}: the '
                     'tile length).')


class Embedder:
  """A trained model loaded once from a workdir; embeds feature-store clips, audio files and tiles."""

  def __init__(self, workdir: str, *, step: int | None = None, batch_size: int = 64, hop_seconds: float | None = None):
    check_hop_seconds(hop_seconds, 'hop_seconds', 'None')
    self.workdir = os.path.abspath(workdir)
    self.info = checkpoint_lib.read_model_info(self.workdir)
    # Read-only: a reader must never clean up the folder a running training is saving into.
    with _quiet_checkpoint_reading():
      checkpointer = checkpoint_lib.Checkpointer(self.workdir, read_only=True)
      self.step = checkpointer.latest_step() if step is None else step
      saved = checkpointer.restore_raw(self.step)
    self.frontend = FrontEnd(**self.info['frontend'])
    self.tile_frames = int(self.info['tile_frames'])
    # Default hop: the tile's length in seconds, the original's non-overlapping grid (5-s tiles of 498 frames
    # every 500 frames, so a 10-s clip holds exactly two).
    hop_seconds = self.info.get('tile_seconds', self.tile_frames / self.frontend.frame_rate) \
        if hop_seconds is None else hop_seconds
    self.hop_frames = max(1, int(round(hop_seconds * self.frontend.frame_rate)))
    model_config = ml_collections.ConfigDict(self.info['model'])
    self.model = models.create_model(model_config, band_mean=tuple(self.info['band_mean']),
                                     band_std=tuple(self.info['band_std']))
    variables = {'params': saved['params'], 'batch_stats': saved.get('batch_stats', {})}
    self.embed_tiles = TileEmbedder(self.model, variables, batch_size=batch_size)

  @classmethod
  def from_model(cls, model, variables: dict, *, frontend: FrontEnd, tile_frames: int, batch_size: int = 64,
                 hop_frames: int | None = None) -> 'Embedder':
    """An embedder around in-memory weights (e.g. a randomly initialised network as a baseline)."""
    self = cls.__new__(cls)
    self.workdir, self.info, self.step = None, {}, None
    self.frontend, self.tile_frames = frontend, tile_frames
    self.hop_frames = hop_frames or tile_frames
    self.model = model
    self.embed_tiles = TileEmbedder(model, variables, batch_size=batch_size)
    return self

  @property
  def hop_seconds(self) -> float:
    return self.hop_frames / self.frontend.frame_rate

  @property
  def tile_seconds(self) -> float:
    """The stretch of audio one tile covers: from its first frame's first sample to its last frame's last."""
    frontend = self.frontend
    return ((self.tile_frames - 1) * frontend.hop_length + frontend.win_length) / frontend.sample_rate

  def tiles_of_frames(self, frames: np.ndarray, *, cover_end: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """([n, T, M] tiles, [n] start seconds) of one clip's frames: every hop, and one tile aligned to the end where
    the grid stops short of it (`cover_end`, as in `tile_starts`)."""
    tiles, starts = cut_tiles(frames, self.tile_frames, self.hop_frames, np.log(self.frontend.log_offset),
                              cover_end=cover_end)
    return tiles, starts / self.frontend.frame_rate

  def embed_frames(self, frames: np.ndarray, *, trunk: bool = False) -> dict:
    """Embeddings of one clip's log-Mel frames [frames, bands]; see `embed_audio` for what it returns."""
    _check_log_mel(frames)
    tiles, times = self.tiles_of_frames(frames)
    if trunk:
      out = self.embed_tiles(tiles, trunk=True)
      return self._result(out['embedding'], times, out['trunk'])
    return self._result(self.embed_tiles(tiles), times)

  def _result(self, embeddings: np.ndarray, times: np.ndarray, trunk: np.ndarray | None = None) -> dict:
    if not np.all(np.isfinite(embeddings)) or (trunk is not None and not np.all(np.isfinite(trunk))):
      raise EmbedError(f'the model gives non-finite embeddings; its checkpoint (step {self.step}) may be damaged: '
                       'try another with --step')
    result = {'embeddings': embeddings, 'timestamps': times.astype(np.float32),
              'centre_timestamps': (times + self.tile_seconds / 2).astype(np.float32),
              'clip_embedding': l2_normalise(embeddings.mean(axis=0))}
    if trunk is not None:
      result['trunk'] = trunk
      result['clip_trunk'] = trunk.mean(axis=0)
    return result

  def embed_audio(self, samples: np.ndarray, sample_rate: int, *, trunk: bool = False) -> dict:
    """Embeddings of in-memory audio at any `sample_rate`: [samples] or [samples, channels] (averaged to mono) as
    soundfile.read returns it, float or integer PCM (scaled as soundfile scales it; see `to_mono`).

    Returns {'embeddings': [n, E] (one per tile), 'timestamps': [n] tile starts and 'centre_timestamps': [n] tile
    centres in seconds, 'clip_embedding': [E] (the tiles' mean, L2-normalised)}, and with `trunk` also 'trunk':
    [n, C], each tile's pooled trunk features from the same pass (the head's input, not normalised), and
    'clip_trunk': [C], their mean. Tiles lie on the hop grid, plus one aligned to the end of the audio where the
    grid stops short of it (see `tile_starts`).
    """
    samples = to_mono(samples)
    if not np.all(np.isfinite(samples)):  # Decoded files are checked by audio.load_audio already.
      raise EmbedError('the audio holds NaN or infinite samples')
    return self.embed_frames(self._log_mel_of_audio(samples, sample_rate), trunk=trunk)

  def _log_mel_of_audio(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """float32 [frames, bands] log-Mel of finite mono `samples` at `sample_rate`."""
    if int(sample_rate) != self.frontend.sample_rate:
      samples = soxr.resample(samples, int(sample_rate), self.frontend.sample_rate, quality='HQ')
    frames = log_mel(np.asarray(samples, np.float32), self.frontend)
    if frames.shape[0] == 0:
      raise EmbedError(f'the audio is shorter than one analysis window ({self.frontend.win_length} samples at '
                       f'{self.frontend.sample_rate} Hz)')
    return frames

  def embed_file(self, path: str, *, trunk: bool = False) -> dict:
    """Embeddings of an audio file of any length and format (see `embed_audio`); raises audio.AudioError naming
    the file if it cannot be read or embedded."""
    samples = audio.load_audio(path, self.frontend.sample_rate)
    try:
      return self.embed_audio(samples, self.frontend.sample_rate, trunk=trunk)
    except EmbedError as e:
      raise audio.AudioError(path, str(e)) from None

  def _file_tiles(self, path: str) -> _FileTiles:
    """Decode and log-Mel of one file, and where its tiles start (in a worker thread); failures are returned."""
    try:
      frames = self._log_mel_of_audio(audio.load_audio(path, self.frontend.sample_rate), self.frontend.sample_rate)
      _check_log_mel(frames)
    except audio.AudioError as e:
      return _FileTiles(path, error=e)
    except EmbedError as e:
      return _FileTiles(path, error=audio.AudioError(path, str(e)))
    frames = pad_to_tile(frames, self.tile_frames, np.log(self.frontend.log_offset))
    starts = tile_starts(frames.shape[0], self.tile_frames, self.hop_frames, cover_end=True)
    return _FileTiles(path, frames=frames, starts=starts)

  def embed_files(self, paths: Iterable[str], *, num_workers: int = 2, trunk: bool = False
                  ) -> Iterator[tuple[str, dict | audio.AudioError]]:
    """(path, `embed_file`'s result or the AudioError that says why not) for each of `paths`, in order.

    The tiles of many files share each batch (a 10-s clip does not pay for a batch of its own), and the next
    files are decoded and their log-Mel computed by `num_workers` threads (decoding, resampling and the FFT
    release the GIL) while the model runs; at most a few files per thread wait, decoded, in memory. The
    embeddings (and with `trunk` the trunk features) equal those of `embed_file`, file by file.
    """
    batch_size = self.embed_tiles.batch_size
    # Two batch buffers: one is filled while the model reads the other (the CPU backend may share its memory).
    buffers = [np.zeros((batch_size, self.tile_frames, self.frontend.n_mels), np.float32) for _ in range(2)]
    rows: list[tuple[_FileTiles, int]] = []  # which file and tile each row of the batch being filled holds
    in_flight = None  # (device result, rows) of the batch the model is computing
    waiting: collections.deque[_FileTiles] = collections.deque()  # files not yet handed out, in input order

    def collect():
      out, out_rows = in_flight
      embeddings = np.asarray(out['embedding'] if trunk else out)
      trunk_rows = np.asarray(out['trunk']) if trunk else None
      for row, (file, tile) in enumerate(out_rows):
        file.embeddings[tile] = embeddings[row]
        if trunk:
          file.trunk[tile] = trunk_rows[row]
        file.missing -= 1

    def finished():
      while waiting and waiting[0].missing == 0:
        file = waiting.popleft()
        if file.error is not None:
          yield file.path, file.error
          continue
        try:
          yield file.path, self._result(np.stack(file.embeddings), file.starts / self.frontend.frame_rate,
                                        np.stack(file.trunk) if trunk else None)
        except EmbedError as e:
          yield file.path, audio.AudioError(file.path, str(e))

    def dispatch():
      nonlocal in_flight, rows
      batch = buffers[0]
      batch[len(rows):] = 0  # a last, part-filled batch: the rest is padding, whose embeddings are dropped
      started = (self.embed_tiles.dispatch(batch, trunk=trunk), rows)
      if in_flight is not None:
        collect()
      in_flight, rows = started, []
      buffers.reverse()

    # One BLAS thread per decoding thread (numpy's BLAS only; the model has its own threads): more only contend
    # (docs/benchmarks.md, "Smaller CPU timings").
    with threadpoolctl.threadpool_limits(1, user_api='blas'), \
        concurrent.futures.ThreadPoolExecutor(max(1, num_workers), thread_name_prefix='embed-decode') as pool:
      for file in _map_ahead(pool, self._file_tiles, paths, ahead=2 * max(1, num_workers) + 2):
        waiting.append(file)
        if file.error is not None:
          continue
        file.embeddings = [None] * len(file.starts)
        file.trunk = [None] * len(file.starts)
        file.missing = len(file.starts)
        for tile, start in enumerate(file.starts):
          buffers[0][len(rows)] = file.frames[start:start + self.tile_frames]
          rows.append((file, tile))
          if len(rows) == batch_size:
            dispatch()
            yield from finished()
        file.frames = None  # copied into batches; free it before the next file is decoded
      if rows:
        dispatch()
      if in_flight is not None:
        collect()
      yield from finished()

  def embed_features(self, features: Features, clips: list[Clip] | None = None, *, trunk: bool = False) -> dict:
    """Per-tile embeddings of feature-store clips (default: all); see `embed_clips` for what it returns, with the
    tiles' embeddings under 'embeddings', their mean per clip under 'clip_embeddings' and, with `trunk`, the pooled
    trunk features of the same pass (the head's input) under 'trunk'."""
    check_frontend(features, self)
    tile_fn = functools.partial(self.embed_tiles, trunk=True) if trunk else self.embed_tiles
    table = embed_clips(features, features.clips if clips is None else clips, {'embedding': tile_fn},
                        tile_frames=self.tile_frames, hop_frames=self.hop_frames)
    table['embeddings'] = table.pop('embedding')
    if trunk:
      table.setdefault('trunk', np.zeros((0, 0), np.float32))  # no clips: embed_clips names no second output
    table['clip_embeddings'] = pool_per_clip(table['embeddings'], table['clip_index'], len(table['clips']))
    return table


def check_frontend(features: Features, embedder: 'Embedder') -> None:
  """Raises EmbedError, naming both settings, when `features` were made with another front end than the model's."""
  if features.frontend == embedder.frontend:
    return
  differences = ', '.join(f'{name}={getattr(features.frontend, name)!r} in the features, '
                          f'{getattr(embedder.frontend, name)!r} for the model'
                          for name in vars(embedder.frontend)
                          if getattr(features.frontend, name) != getattr(embedder.frontend, name))
  raise EmbedError(f'the features in {features.root} were made with other front-end settings than the model in '
                   f'{embedder.workdir} was trained on ({differences}); preprocess the audio with the model\'s '
                   'settings (its model.json, "frontend").')


# Integer PCM as soundfile scales it when it reads a file as float: (x - offset) / full scale.
_PCM_SCALE = {np.dtype(np.int16): (0, 2 ** 15), np.dtype(np.int32): (0, 2 ** 31), np.dtype(np.int8): (0, 2 ** 7),
              np.dtype(np.uint8): (2 ** 7, 2 ** 7)}


def as_float_samples(samples) -> np.ndarray:
  """float32 samples (full scale 1.0) of float audio, or of integer PCM scaled as soundfile scales it: int16 / 2**15,
  int32 / 2**31, int8 / 2**7, uint8 (x - 128) / 2**7. Other dtypes are refused: their full scale is unknown."""
  samples = np.asarray(samples)
  if samples.dtype in _PCM_SCALE:
    offset, scale = _PCM_SCALE[samples.dtype]
    return (samples.astype(np.float32) - np.float32(offset)) / np.float32(scale)  # powers of two: exact
  if not np.issubdtype(samples.dtype, np.floating):
    raise EmbedError(f'audio samples of dtype {samples.dtype}: pass float samples (full scale 1.0) or integer PCM '
                     '(int16, int32, int8, uint8)')
  return samples.astype(np.float32, copy=False)


def to_mono(samples) -> np.ndarray:
  """float32 mono samples of [samples] or [samples, channels] audio (the channel mean), the layout soundfile.read
  returns; integer PCM is scaled as soundfile scales it (see `as_float_samples`).

  Refused with the fix: empty audio, and a 2-D array with more channels than samples, which is [channels, samples]
  (torchaudio's and librosa's layout; a clip that short could not be embedded anyway).
  """
  samples = np.asarray(samples)
  if samples.ndim not in (1, 2):
    raise EmbedError(f'audio must be [samples] or [samples, channels]; got shape {samples.shape}')
  if samples.size == 0:
    raise EmbedError(f'empty audio: 0 samples (shape {samples.shape})')
  if samples.ndim == 2 and samples.shape[1] > samples.shape[0]:
    raise EmbedError(f'audio of shape {samples.shape} looks like [channels, samples] ({samples.shape[0]} channels of '
                     f'{samples.shape[1]} samples); audio is [samples] or [samples, channels], as soundfile.read '
                     'returns it: pass samples.T')
  samples = as_float_samples(samples)
  return samples.mean(axis=1) if samples.ndim == 2 else samples


def mean_per_clip(values: np.ndarray, clip_index: np.ndarray, num_clips: int) -> np.ndarray:
  """float32 [num_clips, D]: the mean of each clip's rows (tiles) of `values` [N, D]."""
  sums = np.zeros((num_clips, values.shape[1]), np.float32)
  np.add.at(sums, clip_index, values)
  return (sums / np.maximum(np.bincount(clip_index, minlength=num_clips), 1)[:, None]).astype(np.float32)


def pool_per_clip(embeddings: np.ndarray, clip_index: np.ndarray, num_clips: int) -> np.ndarray:
  """[num_clips, E]: the mean of each clip's tile embeddings, L2-normalised."""
  pooled = np.zeros((num_clips, embeddings.shape[1]), np.float32)
  np.add.at(pooled, clip_index, embeddings)
  return l2_normalise(pooled)


def embed_clips(features: Features, clips: list[Clip], tile_fns: dict, *, tile_frames: int, hop_frames: int,
                batch_clips: int = 64, on_progress=None) -> dict:
  """Cuts every clip into tiles (every hop, as `tile_starts`) and applies each of `tile_fns` ([n, T, M] -> [n, D]).

  A function may instead return {output name: [n, D]}, several outputs of one pass (e.g. the model's embedding and
  its trunk features): each output becomes an entry of its own, under its name. The features are read once,
  whatever the number of functions (the model and its baselines); `on_progress(n)` is called after each batch of n
  clips. Returns {name: [N, D] for each output, 'clip_index': [N] (into `clips`), 'start_seconds': [N],
  'clips': clips}.
  """
  fill = np.log(features.frontend.log_offset)
  outputs = collections.defaultdict(list)
  clip_index, starts = [], []
  for first in range(0, len(clips), batch_clips):
    chunk = clips[first:first + batch_clips]
    tiles = []
    for i, frames in enumerate(features.read_many([(c.clip_id, 0, None) for c in chunk])):
      clip_tiles, positions = cut_tiles(frames, tile_frames, hop_frames, fill)
      tiles.append(clip_tiles)
      clip_index.append(np.full(len(positions), first + i))
      starts.append(positions / features.frame_rate)
    tiles = np.concatenate(tiles)
    for name, fn in tile_fns.items():
      result = fn(tiles)
      for output, values in (result.items() if isinstance(result, dict) else [(name, result)]):
        outputs[output].append(np.asarray(values, dtype=np.float32))
    if on_progress is not None:
      on_progress(len(chunk))
  result = {name: np.concatenate(parts) for name, parts in outputs.items()}
  if not clips:
    result = {name: np.zeros((0, 0), np.float32) for name in tile_fns}
  result['clip_index'] = np.concatenate(clip_index) if clip_index else np.zeros(0, np.int64)
  result['start_seconds'] = np.concatenate(starts) if starts else np.zeros(0)
  result['clips'] = clips
  return result


def find_audio_files(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise EmbedError(f'--input={path} does not exist; name an audio file or a folder of them.')
  found = []
  for dirpath, dirnames, filenames in os.walk(path):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
    found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if audio.is_audio_file(f) and f[0] != '.')
  return found


def output_name(path: str, root: str) -> str:
  """`path`'s output, relative to the output folder: its path under `root` with '.npz' added (x.wav -> x.wav.npz),
  so files that differ only in their extension never share one."""
  return os.path.relpath(path, root) + '.npz'


def prepare_output_dir(output_dir: str) -> None:
  """Creates `output_dir` or raises EmbedError naming the problem: a file in the way, or no permission to write."""
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise EmbedError(f'--output_dir={output_dir} is a file; name a folder (it is created if missing).')
  try:
    os.makedirs(output_dir, exist_ok=True)
    probe = os.path.join(output_dir, f'.write_test_{os.getpid()}')
    with open(probe, 'w'):
      pass
    os.remove(probe)
  except OSError as e:
    raise EmbedError(f'cannot write to --output_dir={output_dir} ({e.strerror}); name a folder you can write to.') \
        from None


def default_num_workers() -> int:
  """Decoding threads: the usable cores (the affinity mask), at most 4: the model's own threads need the rest."""
  return max(1, min(4, len(os.sched_getaffinity(0))))


# What each output .npz records about how it was made, beside its arrays (see `output_settings`).
SETTINGS = ('workdir', 'checkpoint_step', 'tile_seconds', 'hop_seconds', 'representations')


def output_settings(embedder: Embedder, *, trunk: bool = False) -> dict:
  """The settings an output of `embedder` records: its workdir (absolute; '' for in-memory weights), checkpoint
  step (-1 for in-memory weights), tile and hop in seconds, and the representations the file holds."""
  return {'workdir': embedder.workdir or '', 'checkpoint_step': -1 if embedder.step is None else int(embedder.step),
          'tile_seconds': float(embedder.tile_seconds), 'hop_seconds': float(embedder.hop_seconds),
          'representations': ['embedding', 'trunk'] if trunk else ['embedding']}


def recorded_settings(target: str) -> dict | None:
  """The settings the output .npz `target` records; None if it records none (written before they were recorded)
  or cannot be read."""
  try:
    with np.load(target) as npz:
      if not set(SETTINGS) <= set(npz.files):
        return None
      return {'workdir': str(npz['workdir']), 'checkpoint_step': int(npz['checkpoint_step']),
              'tile_seconds': float(npz['tile_seconds']), 'hop_seconds': float(npz['hop_seconds']),
              'representations': [str(r) for r in npz['representations']]}
  except (OSError, ValueError, zipfile.BadZipFile):
    return None


def same_settings(recorded: dict | None, wanted: dict) -> bool:
  """Whether an output that records `recorded` was made with the settings `wanted` (None records nothing: no)."""
  if recorded is None:
    return False
  return all(math.isclose(recorded[k], v, rel_tol=1e-9) if isinstance(v, float) else recorded[k] == v
             for k, v in wanted.items())


# A file being written is named `<final name>.partial-<pid>`: it never ends in .npz, so no reader takes it for an
# output, and a later run removes what a killed one left (`remove_partial_files`).
PARTIAL_MARK = '.partial-'
_PARTIAL_NAME = re.compile(re.escape(PARTIAL_MARK) + r'(\d+)$')
# Write errors that concern every file (the disk, the file system) stop the run; others concern one file.
_WRITE_ERRORS_OF_ALL_FILES = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


def write_embeddings(target: str, result: dict, settings: dict) -> None:
  """Writes one file's .npz, with the `settings` it was made with, atomically (a temporary name, then a rename): a
  run killed mid-write leaves no partial file that a later run would take as done. An operating-system error (a
  full disk) names the file and leaves no partial one."""
  tmp = None
  try:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # A short name beside the target (a long file name plus a suffix could pass the system's limit).
    fd, tmp = tempfile.mkstemp(prefix='.', suffix=f'{PARTIAL_MARK}{os.getpid()}', dir=os.path.dirname(target))
    with os.fdopen(fd, 'wb') as f:  # a file object: np.savez would append .npz to a name
      np.savez(f, **result, **settings)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would make outputs private, unlike any other file written
    os.replace(tmp, target)
  except OSError as e:
    if tmp:
      with contextlib.suppress(OSError):
        os.remove(tmp)
    raise OSError(e.errno, e.strerror, e.filename or target) from None


def _process_alive(pid: str) -> bool:
  try:
    os.kill(int(pid), 0)
  except (ValueError, ProcessLookupError):
    return False
  except PermissionError:  # another user's process
    return True
  return True


def remove_partial_files(output_dir: str) -> int:
  """Removes the partial files that runs killed while writing left under `output_dir` (not those of a process
  still running, which may be writing beside this one); returns how many."""
  removed = 0
  for folder, _, names in os.walk(output_dir):
    for name in names:
      match = _PARTIAL_NAME.search(name)
      if match and not _process_alive(match.group(1)):
        with contextlib.suppress(OSError):
          os.remove(os.path.join(folder, name))
          removed += 1
  return removed


def embed_paths(embedder: Embedder, input_path: str, output_dir: str, *, overwrite: bool = False,
                num_workers: int | None = None, show_progress: bool | None = None, trunk: bool = False) -> dict:
  """Embeds every audio file under `input_path` into `output_dir`/<relative path>.npz (see `output_name`); returns
  {'written': [...], 'existing': [...], 'reembedded': [...], 'failures': [{'path', 'reason'}], 'checkpoint_step',
  'settings'}.

  Each output records the settings it was made with (`output_settings`). Files whose output exists with the same
  settings are left as they are (listed in 'existing') unless `overwrite`, so a stopped run, started again, does
  only what is left. An output made with other settings (another workdir, step, hop, or set of representations), or
  one that records none (an older version's), counts as not yet written: the file is embedded again, and listed in
  'reembedded' as well as in 'written', so that no folder silently holds two settings. `trunk` also writes each
  tile's pooled trunk features and their mean ('trunk' and 'clip_trunk', see `Embedder.embed_audio`). The tiles of
  many files share each batch and files are decoded ahead in `num_workers` threads (see `Embedder.embed_files`).
  A file that cannot be read or embedded is reported and skipped. Progress: a bar on a terminal, a log line every
  30 s otherwise (`show_progress` forces).
  """
  files = find_audio_files(input_path)
  prepare_output_dir(output_dir)
  remove_partial_files(output_dir)
  root = input_path if os.path.isdir(input_path) else os.path.dirname(input_path)
  targets = {path: os.path.join(output_dir, output_name(path, root)) for path in files}
  settings = output_settings(embedder, trunk=trunk)
  kept, other_settings = set(), set()
  for path, target in targets.items():
    if not overwrite and os.path.exists(target):
      (kept if same_settings(recorded_settings(target), settings) else other_settings).add(path)
  existing = [targets[path] for path in files if path in kept]
  todo = [path for path in files if path not in kept]
  written, reembedded, failures = [], [], []
  progress = log_util.Progress('embed', len(todo), unit='file', interactive=show_progress)
  for path, result in embedder.embed_files(todo, num_workers=num_workers or default_num_workers(), trunk=trunk):
    if not isinstance(result, audio.AudioError):
      try:
        write_embeddings(targets[path], result, settings)
      except OSError as e:
        if e.errno in _WRITE_ERRORS_OF_ALL_FILES:
          raise
        result = audio.AudioError(path, f'its output {targets[path]} cannot be written ({e.strerror})')
    if isinstance(result, audio.AudioError):
      reason = result.reason
      if path in other_settings:  # an output of other settings must not stay beside this run's
        with contextlib.suppress(FileNotFoundError):
          os.remove(targets[path])
        reason += '; its older output, made with other settings, was removed'
      failures.append({'path': path, 'reason': reason})
    else:
      written.append(targets[path])
      if path in other_settings:
        reembedded.append(targets[path])
    progress.update()
  progress.close()
  return {'written': written, 'existing': existing, 'reembedded': reembedded, 'failures': failures,
          'checkpoint_step': embedder.step, 'settings': settings}


def run(workdir: str, input_path: str, output_dir: str, *, step: int | None = None,
        hop_seconds: float | None = None, batch_size: int = 64, overwrite: bool = False,
        num_workers: int | None = None, trunk: bool = False) -> dict:
  """The command line's work: embeds, writes output_dir/embed_summary.json, returns the summary."""
  if not os.path.exists(input_path):
    raise EmbedError(f'--input={input_path} does not exist; name an audio file or a folder of them.')
  if batch_size < 1:
    raise EmbedError(f'--batch_size={batch_size}; give 1 or more tiles per batch.')
  check_hop_seconds(hop_seconds, '--hop_seconds', 'default')  # before the output folder is made
  if num_workers is not None and num_workers < 1:
    raise EmbedError(f'--num_workers={num_workers}; give 1 or more decoding threads.')
  prepare_output_dir(output_dir)
  embedder = Embedder(workdir, step=step, hop_seconds=hop_seconds, batch_size=batch_size)
  summary = embed_paths(embedder, input_path, output_dir, overwrite=overwrite, num_workers=num_workers,
                        trunk=trunk)
  with open(os.path.join(output_dir, 'embed_summary.json'), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=1)
  return summary
