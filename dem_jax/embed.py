r"""Embeddings from a trained workdir: of feature-store clips, of audio files of any length, of raw tiles.

    from dem_jax.embed import Embedder
    embedder = Embedder('/scratch/dcase_run')              # latest checkpoint; Embedder(w, step=N) for another
    out = embedder.embed_file('kitchen.wav')              # {'embeddings': [n, E], 'timestamps': [n], 'clip_embedding': [E]}
    table = embedder.embed_features(open_features('/data/features/dcase_dev'))

Tiles are cut every `hop_seconds` (default: the tile length in seconds, the original's non-overlapping grid); a tile's
timestamp is its start in seconds. Audio shorter than one tile is padded with silence to one tile. The pooled clip
embedding is the mean of the tile embeddings, L2-normalised again.

Command line: embed a file or a folder (recursively), one .npz per input (embeddings, timestamps, clip_embedding):

    ./launch.sh embed --workdir=W --input=FILE_OR_DIR --output_dir=O
"""

from __future__ import annotations

import os
import sys

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dem_jax import audio
from dem_jax import checkpoint as checkpoint_lib
from dem_jax import models
from dem_jax.features import Clip, Features
from dem_jax.frontend import FrontEnd, log_mel


def tile_starts(num_frames: int, tile_frames: int, hop_frames: int) -> np.ndarray:
  """Start frames of the tiles cut from a clip: every hop while a whole tile fits; one tile if none fits."""
  if num_frames <= tile_frames:
    return np.zeros(1, dtype=np.int64)
  return np.arange(0, num_frames - tile_frames + 1, hop_frames, dtype=np.int64)


def pad_to_tile(frames: np.ndarray, tile_frames: int, fill: float) -> np.ndarray:
  if frames.shape[0] >= tile_frames:
    return frames
  pad = np.full((tile_frames - frames.shape[0], frames.shape[1]), fill, dtype=frames.dtype)
  return np.concatenate([frames, pad])


def cut_tiles(frames: np.ndarray, tile_frames: int, hop_frames: int, fill: float) -> tuple[np.ndarray, np.ndarray]:
  """([n, T, M] tiles, [n] start frames) of one clip: padded with `fill` to one tile if shorter, then every hop."""
  frames = pad_to_tile(frames, tile_frames, fill)
  starts = tile_starts(frames.shape[0], tile_frames, hop_frames)
  return np.stack([frames[s:s + tile_frames] for s in starts]), starts


def l2_normalise(x: np.ndarray, axis: int = -1) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


class TileEmbedder:
  """A jit-compiled forward pass over fixed-size batches, data-parallel over all local devices.

  The batch shape never changes (the last batch is padded), so it compiles once.
  """

  def __init__(self, model, variables: dict, *, batch_size: int = 64):
    devices = jax.local_devices()
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    mesh = Mesh(np.array(devices), ('data',))
    self._batch_sharding = NamedSharding(mesh, P('data'))
    self._replicated = NamedSharding(mesh, P())
    self.set_variables(variables)
    self._forward = jax.jit(lambda v, x: model.apply(v, x, train=False),
                            in_shardings=(NamedSharding(mesh, P()), self._batch_sharding),
                            out_shardings=self._batch_sharding)

  def set_variables(self, variables: dict) -> None:
    """New weights of the same shapes (no recompilation)."""
    self._variables = jax.device_put(variables, self._replicated)

  def __call__(self, tiles: np.ndarray) -> np.ndarray:
    """[N, T, M] -> float32 [N, E]."""
    n = tiles.shape[0]
    out = []
    for start in range(0, n, self.batch_size):
      chunk = np.asarray(tiles[start:start + self.batch_size], dtype=np.float32)
      if chunk.shape[0] < self.batch_size:
        chunk = np.concatenate([chunk, np.zeros((self.batch_size - chunk.shape[0],) + chunk.shape[1:], np.float32)])
      out.append(self._forward(self._variables, jax.device_put(chunk, self._batch_sharding)))
    if not out:
      return np.zeros((0, 0), np.float32)
    return np.concatenate([np.asarray(o) for o in out])[:n]


class Embedder:
  """A trained model loaded once from a workdir; embeds feature-store clips, audio files and tiles."""

  def __init__(self, workdir: str, *, step: int | None = None, batch_size: int = 64, hop_seconds: float | None = None):
    self.workdir = os.path.abspath(workdir)
    self.info = checkpoint_lib.read_model_info(self.workdir)
    checkpointer = checkpoint_lib.Checkpointer(self.workdir)
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

  def tiles_of_frames(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([n, T, M] tiles, [n] start seconds) of one clip's frames."""
    tiles, starts = cut_tiles(frames, self.tile_frames, self.hop_frames, np.log(self.frontend.log_offset))
    return tiles, starts / self.frontend.frame_rate

  def embed_frames(self, frames: np.ndarray) -> dict:
    tiles, times = self.tiles_of_frames(frames)
    embeddings = self.embed_tiles(tiles)
    return {'embeddings': embeddings, 'timestamps': times.astype(np.float32),
            'clip_embedding': l2_normalise(embeddings.mean(axis=0))}

  def embed_file(self, path: str) -> dict:
    """Embeddings of an audio file of any length and format; raises audio.AudioError if it cannot be read."""
    samples = audio.load_audio(path, self.frontend.sample_rate)
    frames = log_mel(samples, self.frontend)
    if frames.shape[0] == 0:
      raise audio.AudioError(path, 'shorter than one analysis window')
    return self.embed_frames(frames)

  def embed_features(self, features: Features, clips: list[Clip] | None = None) -> dict:
    """Per-tile embeddings of feature-store clips (default: all); see `embed_clips` for what it returns."""
    if features.frontend != self.frontend:
      raise ValueError(f'The features in {features.root} were made with another front end than this model was '
                       'trained on; preprocess the data with the same settings.')
    table = embed_clips(features, features.clips if clips is None else clips, {'model': self.embed_tiles},
                        tile_frames=self.tile_frames, hop_frames=self.hop_frames)
    table['embeddings'] = table.pop('model')
    table['clip_embeddings'] = pool_per_clip(table['embeddings'], table['clip_index'], len(table['clips']))
    return table


def pool_per_clip(embeddings: np.ndarray, clip_index: np.ndarray, num_clips: int) -> np.ndarray:
  """[num_clips, E]: the mean of each clip's tile embeddings, L2-normalised."""
  pooled = np.zeros((num_clips, embeddings.shape[1]), np.float32)
  np.add.at(pooled, clip_index, embeddings)
  return l2_normalise(pooled)


def embed_clips(features: Features, clips: list[Clip], tile_fns: dict, *, tile_frames: int, hop_frames: int,
                batch_clips: int = 64) -> dict:
  """Cuts every clip into tiles (every hop, as `tile_starts`) and applies each of `tile_fns` ([n, T, M] -> [n, D]).

  The features are read once, whatever the number of functions (the model and its baselines). Returns
  {name: [N, D] for each function, 'clip_index': [N] (into `clips`), 'start_seconds': [N], 'clips': clips}.
  """
  fill = np.log(features.frontend.log_offset)
  outputs = {name: [] for name in tile_fns}
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
      outputs[name].append(np.asarray(fn(tiles), dtype=np.float32))
  result = {name: np.concatenate(parts) if parts else np.zeros((0, 0), np.float32) for name, parts in outputs.items()}
  result['clip_index'] = np.concatenate(clip_index) if clip_index else np.zeros(0, np.int64)
  result['start_seconds'] = np.concatenate(starts) if starts else np.zeros(0)
  result['clips'] = clips
  return result


def find_audio_files(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f'--input={path} is neither a file nor a folder.')
  found = []
  for dirpath, dirnames, filenames in os.walk(path):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
    found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if audio.is_audio_file(f) and f[0] != '.')
  return found


def embed_paths(embedder: Embedder, input_path: str, output_dir: str, *, show_progress: bool = True) -> dict:
  """Embeds every audio file under `input_path` into `output_dir`/<relative path>.npz; returns a summary
  {'written': [...], 'failures': [{'path', 'reason'}]}. A file that cannot be read is reported and skipped."""
  import tqdm  # Only the command line shows a bar.
  files = find_audio_files(input_path)
  root = input_path if os.path.isdir(input_path) else os.path.dirname(input_path)
  written, failures = [], []
  for path in tqdm.tqdm(files, unit='file', disable=not show_progress):
    target = os.path.join(output_dir, os.path.splitext(os.path.relpath(path, root))[0] + '.npz')
    try:
      result = embedder.embed_file(path)
    except audio.AudioError as e:
      failures.append({'path': path, 'reason': e.reason})
      continue
    os.makedirs(os.path.dirname(target), exist_ok=True)
    np.savez(target, embeddings=result['embeddings'], timestamps=result['timestamps'],
             clip_embedding=result['clip_embedding'], hop_seconds=embedder.hop_seconds)
    written.append(target)
  return {'written': written, 'failures': failures, 'checkpoint_step': embedder.step}


def main(argv):
  del argv
  import json
  from absl import flags
  FLAGS = flags.FLAGS
  from dem_jax import cpu_ops
  from dem_jax import log_util
  cpu_ops.retain_freed_memory_on_cpu()  # before the CPU backend starts its threads
  log_util.quiet_library_logs()
  embedder = Embedder(FLAGS.workdir, step=FLAGS.step, hop_seconds=FLAGS.hop_seconds)
  summary = embed_paths(embedder, FLAGS.input, FLAGS.output_dir, show_progress=sys.stderr.isatty())
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  with open(os.path.join(FLAGS.output_dir, 'embed_summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  for failure in summary['failures']:
    print(f'skipped {failure["path"]}: {failure["reason"]}', file=sys.stderr)
  print(json.dumps({'written': len(summary['written']), 'failures': len(summary['failures']),
                    'output_dir': os.path.abspath(FLAGS.output_dir)}))
  if not summary['written']:
    sys.exit('embed: no file could be embedded.')


if __name__ == '__main__':
  from absl import app
  from absl import flags
  flags.DEFINE_string('workdir', None, 'Training workdir.', required=True)
  flags.DEFINE_string('input', None, 'An audio file or a folder (searched recursively).', required=True)
  flags.DEFINE_string('output_dir', None, 'Where the .npz files go (mirroring the input tree).', required=True)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_float('hop_seconds', None, 'Tile hop in seconds (default: the tile length).')
  app.run(main)
