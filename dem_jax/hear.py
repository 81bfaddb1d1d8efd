r"""The HEAR 2021 API (Holistic Evaluation of Audio Representations) for a trained dem_jax model.

    import dem_jax.hear as hear
    model = hear.load_model('/scratch/dcase_run')          # a workdir (latest checkpoint), or .../checkpoints/N
    scene = hear.get_scene_embeddings(audio, model)        # audio: torch [n, samples] at 16 kHz -> [n, E]
    emb, ms = hear.get_timestamp_embeddings(audio, model)  # [n, T, E] and [n, T] timestamps in milliseconds

`load_model` returns a torch module (the HEAR kit takes torch or TensorFlow models; torch comes with
`pip install dem_jax[hear]`) that holds the JAX model; the computation stays in JAX. The functions take numpy arrays
too and then return numpy, without torch. `hear-validator dem_jax.hear -m WORKDIR` checks the API; the README's
"HEAR" section says how the kit's runners (which pin old numpy) are set up beside dem_jax. Audio is float (full
scale 1.0) or integer PCM, scaled as soundfile scales it (int16 / 2**15, ...; see `dem_jax.embed.as_float_samples`).

Which representation: the model's output, 'embedding' (the default), or 'trunk', the pooled features of the trunk's
last block that the head takes as input (`dem-jax embed --trunk` writes the same per tile). Choose it with
`load_model(path, representation='trunk')`, or, where the kit passes the path alone, by ending the path with
`:trunk` (`hear-validator dem_jax.hear -m WORKDIR:trunk`). The model's scene_embedding_size and
timestamp_embedding_size are those of the chosen representation.

What the embeddings are:
- A scene embedding is the model's clip embedding, as `Embedder.embed_audio` gives it: the clip cut into tiles of
  the training length (padded with silence to one tile when shorter), each tile embedded, the mean L2-normalised.
  With the trunk, it is `Embedder.embed_audio`'s 'clip_trunk': the mean of the tiles' pooled trunk features (not
  normalised).
- A timestamp embedding describes the `timestamp_window_seconds` of audio centred on its timestamp (default 1 s,
  at most a tile). It is computed as the model computes a tile's embedding, with the tile's global average replaced
  by an average over that window: the ResNet trunk runs once over the whole clip (padded with silence at both ends),
  its output is averaged over the mel axis, the per-position features are averaged over the window along the time
  axis (with the trunk, these window means are the timestamp embedding), then the model's projection and L2
  normalisation apply. The trunk's time axis has one position per 32 frames (320 ms); running it on 8 copies of the
  clip shifted by 4 frames each gives one position every 40 ms, so the timestamps fall every 40 ms (HEAR asks for at
  most 50 ms), at the centres of those positions. The cost is 8 trunk passes over the clip, whatever its length,
  instead of one tile pass per timestamp; the copies go through one at a time, so a 20-minute sound (HEAR's
  longest) needs the activations of one copy only.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dem_jax import models
from dem_jax.embed import EmbedError, Embedder, apply_with_trunk, as_float_samples, mean_per_clip, pool_per_clip

TIMESTAMP_HOP_FRAMES = 4  # 40 ms at the default 10-ms frame hop; HEAR asks for a hop of at most 50 ms.
TIMESTAMP_WINDOW_SECONDS = 1.0
REPRESENTATIONS = ('embedding', 'trunk')  # the model's output; the pooled trunk features, the head's input


def check_representation(representation: str) -> str:
  """`representation` if it names one of REPRESENTATIONS; ValueError naming them otherwise."""
  if representation not in REPRESENTATIONS:
    raise ValueError(f'representation={representation!r}; choose one of {", ".join(map(repr, REPRESENTATIONS))}.')
  return representation


def trunk_stride(model) -> int:
  """Input frames per position of the trunk's output: the stem conv and max-pool (2 x 2), then 2 per later stage."""
  return 4 * 2 ** (len(model.stage_sizes) - 1)


class HearModel:
  """The numpy core of the HEAR API around an `Embedder`: scene and timestamp embeddings of [n, samples] audio, of
  the model's output (`representation='embedding'`) or of its pooled trunk features ('trunk')."""

  def __init__(self, embedder: Embedder, *, timestamp_window_seconds: float = TIMESTAMP_WINDOW_SECONDS,
               representation: str = 'embedding'):
    self.embedder = embedder
    self.representation = check_representation(representation)
    self.frontend = embedder.frontend
    self.sample_rate = int(self.frontend.sample_rate)
    model = embedder.model
    self.stride = trunk_stride(model)
    if self.stride % TIMESTAMP_HOP_FRAMES:
      raise ValueError(f'the trunk stride ({self.stride} frames) is not a multiple of the timestamp hop '
                       f'({TIMESTAMP_HOP_FRAMES} frames).')
    self.shifts = self.stride // TIMESTAMP_HOP_FRAMES
    tile_seconds = embedder.tile_frames / self.frontend.frame_rate
    window_frames = min(timestamp_window_seconds, tile_seconds) * self.frontend.frame_rate
    # Positions (one per hop) on each side of a timestamp inside its window.
    self.half_window = max(0, int(round(window_frames / TIMESTAMP_HOP_FRAMES / 2)))
    self.timestamp_window_seconds = (2 * self.half_window + 1) * TIMESTAMP_HOP_FRAMES / self.frontend.frame_rate
    self.fill = float(np.log(self.frontend.log_offset))  # log-Mel of silence
    self._variables = jax.device_put(embedder.embed_tiles.variables, jax.local_devices()[0])
    self._head_params = models.head_params(self._variables['params'])
    head = models.Head(model.embedding_dim, model.head_hidden, model.dtype)

    def position_features(variables, frames):
      """[shifts, L, M] log-Mel -> [shifts, L / stride, C]: the trunk's features per time position, mel-averaged."""
      _, trunk = apply_with_trunk(model, variables, frames)
      return jnp.mean(trunk.astype(jnp.float32), axis=2)  # mean over the mel axis: [shifts, positions, C]

    def window_embeddings(head_params, positions, num_timestamps):
      """[P, C] interleaved positions -> [num_timestamps, E]: window means, projected and L2-normalised (the
      trunk's: [num_timestamps, C], the window means)."""
      width = 2 * self.half_window + 1
      sums = jnp.cumsum(jnp.pad(positions, ((1, 0), (0, 0))), axis=0)
      means = (sums[width:width + num_timestamps] - sums[:num_timestamps]) / width
      if self.representation == 'trunk':
        return means
      z = head.apply({'params': head_params}, means).astype(jnp.float32)
      return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), 1e-12))

    self._position_features = jax.jit(position_features)
    self._window_embeddings = jax.jit(window_embeddings, static_argnums=2)
    if self.representation == 'trunk':  # the trunk's channels, from shapes alone
      tile = jax.ShapeDtypeStruct((1, embedder.tile_frames, self.frontend.n_mels), np.float32)
      size = jax.eval_shape(position_features, self._variables, tile).shape[-1]
    else:
      size = model.embedding_dim
    self.scene_embedding_size = self.timestamp_embedding_size = int(size)

  @property
  def timestamp_hop_ms(self) -> float:
    return 1000.0 * TIMESTAMP_HOP_FRAMES / self.frontend.frame_rate

  def _check(self, audio: np.ndarray) -> np.ndarray:
    audio = as_float_samples(audio)
    if audio.ndim != 2:
      raise EmbedError(f'HEAR audio is [n_sounds, n_samples]; got shape {audio.shape}.')
    if not np.all(np.isfinite(audio)):
      raise EmbedError('the audio holds NaN or infinite samples.')
    # At least one analysis window, so that every sound has a log-Mel frame.
    if audio.shape[1] < self.frontend.win_length:
      audio = np.pad(audio, ((0, 0), (0, self.frontend.win_length - audio.shape[1])))
    return audio

  def _log_mel(self, samples: np.ndarray) -> np.ndarray:
    from dem_jax.frontend import log_mel
    frames = log_mel(samples, self.frontend)
    if not np.all(np.isfinite(frames)):
      raise EmbedError('the log-Mel spectrogram holds NaN or infinite values (overflowing samples).')
    return frames

  def scene_embeddings(self, audio: np.ndarray) -> np.ndarray:
    """[n, samples] at `sample_rate` -> float32 [n, scene_embedding_size]: each sound's clip embedding, or the mean
    of its tiles' trunk features (see the module docstring)."""
    audio = self._check(audio)
    tiles, owner = [], []
    for i, samples in enumerate(audio):
      sound_tiles, _ = self.embedder.tiles_of_frames(self._log_mel(samples))
      tiles.append(sound_tiles)
      owner.append(np.full(len(sound_tiles), i))
    if not tiles:
      return np.zeros((0, self.scene_embedding_size), np.float32)
    # One batched pass over every sound's tiles.
    if self.representation == 'trunk':
      trunk = self.embedder.embed_tiles(np.concatenate(tiles), trunk=True)['trunk']
      return self._finite(mean_per_clip(trunk, np.concatenate(owner), len(audio)))
    embeddings = self.embedder.embed_tiles(np.concatenate(tiles))
    return self._finite(pool_per_clip(embeddings, np.concatenate(owner), len(audio)))

  def _finite(self, embeddings: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(embeddings)):
      raise EmbedError(f'the model gives non-finite embeddings; its checkpoint (step {self.embedder.step}) may be '
                       'damaged: load another step (WORKDIR/checkpoints/<step>).')
    return embeddings

  def timestamps_ms(self, num_samples: int) -> np.ndarray:
    """[T] float32: the centre of each timestamp's window, every hop from the start to the end of the sound."""
    hop_samples = TIMESTAMP_HOP_FRAMES * self.frontend.hop_length
    count = max(1, num_samples // hop_samples + 1)
    # Timestamp m's window is centred on log-Mel frame hop * m - 1 (see `_padded`), whose own analysis window is
    # centred win_length / 2 samples after the frame's start.
    centre_frames = TIMESTAMP_HOP_FRAMES * np.arange(count) - 1
    return ((centre_frames * self.frontend.hop_length + self.frontend.win_length / 2)
            / self.frontend.sample_rate * 1000.0).astype(np.float32)

  def _padded(self, frames: np.ndarray, num_timestamps: int) -> np.ndarray:
    """[shifts, L, M]: the frames with silence around them, once per shift of TIMESTAMP_HOP_FRAMES.

    Shift s starts `s` hops later, so its trunk position j is centred on padded frame stride * j + hop * s; in
    interleaved order k = shifts * j + s the positions fall on padded frame hop * k. The left padding of
    hop * half_window + 1 frames puts position half_window + m on frame hop * m - 1 of the sound, so each of the
    num_timestamps windows of 2 * half_window + 1 positions lies inside the padded sound.
    """
    hop, left = TIMESTAMP_HOP_FRAMES, TIMESTAMP_HOP_FRAMES * self.half_window + 1
    positions = num_timestamps + 2 * self.half_window  # interleaved positions needed
    per_shift = -(-positions // self.shifts) + 1
    length = per_shift * self.stride
    total = length + hop * (self.shifts - 1)
    padded = np.full((total, frames.shape[1]), self.fill, np.float32)
    padded[left:left + len(frames)] = frames[:max(0, total - left)]
    return np.stack([padded[hop * s:hop * s + length] for s in range(self.shifts)])

  def timestamp_embeddings(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, samples] -> (float32 [n, T, E] embeddings, float32 [n, T] timestamps in ms); see the module docstring."""
    audio = self._check(audio)
    timestamps = self.timestamps_ms(audio.shape[1])
    count = len(timestamps)
    out = np.zeros((len(audio), count, self.timestamp_embedding_size), np.float32)
    for i, samples in enumerate(audio):
      shifted = self._padded(self._log_mel(samples), count)
      # One shifted copy at a time: the trunk's activations of one copy of a 20-minute sound take a few GB.
      features = jnp.stack([self._position_features(self._variables, copy[None])[0] for copy in shifted])
      interleaved = jnp.swapaxes(features, 0, 1).reshape(-1, features.shape[-1])  # [shifts * J, C]: k = shifts j + s
      out[i] = np.asarray(self._window_embeddings(self._head_params, interleaved, count))
    return self._finite(out), np.broadcast_to(timestamps, (len(audio), count)).copy()


def _torch_module_class():
  try:
    import torch
  except ImportError:
    raise ImportError('dem_jax.hear.load_model returns a torch module for the HEAR kit: pip install '
                      'dem_jax[hear] (or pip install torch).') from None

  class DemJaxHearModule(torch.nn.Module):
    """A torch module holding a dem_jax model for the HEAR kit; the computation runs in JAX."""

    def __init__(self, core: HearModel):
      super().__init__()
      self.core = core
      self.sample_rate = core.sample_rate
      self.scene_embedding_size = core.scene_embedding_size
      self.timestamp_embedding_size = core.timestamp_embedding_size

    def forward(self, audio):
      return get_scene_embeddings(audio, self)

  return DemJaxHearModule


def resolve_model_path(model_file_path: str) -> tuple[str, int | None]:
  """(workdir, step or None for the latest) of a training workdir, its checkpoints/ folder or a step's folder."""
  path = os.path.abspath(model_file_path)
  name = os.path.basename(path)
  if name.isdigit() and os.path.basename(os.path.dirname(path)) == 'checkpoints':
    return os.path.dirname(os.path.dirname(path)), int(name)
  if name == 'checkpoints':
    return os.path.dirname(path), None
  return path, None


def split_representation(model_file_path: str) -> tuple[str, str | None]:
  """(path, representation or None) of a model path that may end with ':trunk' or ':embedding': the HEAR kit's
  command lines pass `load_model` the path alone."""
  path, colon, suffix = model_file_path.rpartition(':')
  return (path, suffix) if colon and suffix in REPRESENTATIONS else (model_file_path, None)


def load_model(model_file_path: str = '', *, representation: str | None = None,
               timestamp_window_seconds: float = TIMESTAMP_WINDOW_SECONDS, batch_size: int = 64):
  """The HEAR model object: a torch module holding the dem_jax model of a training workdir (its latest checkpoint),
  or of one step (WORKDIR/checkpoints/<step>). Needs torch (the `hear` extra).

  `representation`: 'embedding' (the default) or 'trunk' (see the module docstring); a path ending with ':trunk'
  chooses the trunk as well, for the kit's command lines.
  """
  if not model_file_path:
    raise ValueError('dem_jax.hear needs a trained model: pass a training workdir as model_file_path '
                     '(hear-validator dem_jax.hear -m WORKDIR, or -m WORKDIR:trunk for the trunk).')
  path, named = split_representation(model_file_path)
  if representation is not None and named is not None and representation != named:
    raise ValueError(f'load_model({model_file_path!r}, representation={representation!r}) names two '
                     'representations; give one.')
  representation = check_representation(representation or named or 'embedding')
  module_class = _torch_module_class()
  workdir, step = resolve_model_path(path)
  core = HearModel(Embedder(workdir, step=step, batch_size=batch_size),
                   timestamp_window_seconds=timestamp_window_seconds, representation=representation)
  return module_class(core)


def _core(model) -> HearModel:
  return model if isinstance(model, HearModel) else model.core


def _to_numpy(audio) -> tuple[np.ndarray, Any]:
  """(numpy audio, the torch tensor it came from or None)."""
  if isinstance(audio, np.ndarray):
    return audio, None
  return audio.detach().cpu().numpy(), audio


def _like(array: np.ndarray, source):
  if source is None:
    return array
  import torch
  return torch.from_numpy(np.ascontiguousarray(array)).to(source.device)


def get_scene_embeddings(audio, model):
  """[n, samples] audio at model.sample_rate (torch or numpy) -> [n, scene_embedding_size] float32, same kind."""
  array, source = _to_numpy(audio)
  return _like(_core(model).scene_embeddings(array), source)


def get_timestamp_embeddings(audio, model):
  """[n, samples] audio -> ([n, T, timestamp_embedding_size] embeddings, [n, T] timestamps in ms), same kind."""
  array, source = _to_numpy(audio)
  embeddings, timestamps = _core(model).timestamp_embeddings(array)
  return _like(embeddings, source), _like(timestamps, source)


__all__ = ['load_model', 'get_scene_embeddings', 'get_timestamp_embeddings', 'HearModel']
