"""Label-free augmentations of log-Mel training tiles, drawn on the device inside the train step (off by default).

Each tile of a triplet gets its own draw, so the anchor and its neighbour differ by more than their time offset and
the loss rewards what survives the change:
- `freq_shift`: the tile moves by a whole number of mel bands, up to +-freq_shift (the edge band repeats). The
  sound's register changes while its spectral shape stays, so the absolute pitch of a melody tells less.
- `mixup`: a random fraction, up to `mixup`, of another tile of the batch is added, in power, not in log:
  log((1 - a) * exp(x) + a * exp(y)) (BYOL-A's mixing). A background of other sound, as recordings have.
- `eq_db`: a smooth gain curve over the mel bands, up to +-eq_db decibels, is added to the tile: the gains at
  EQ_KNOTS evenly spaced bands are drawn uniformly and joined by straight lines. Brighter or duller, a louder low or
  high end: what sets apart instruments of one kind, or one instrument in two rooms.
- `time_stretch`: a random stretch of the tile's time axis by 1 to 1 / (1 - time_stretch): a window of (1 - s) T
  to T frames at a random offset, resampled to T frames by linear interpolation. A slower tempo, with the
  spectrum as it was.
- `reverb`: the tile as heard in a room of reverberation time up to `reverb` seconds: each frame's magnitude plus
  a tail of the frames before it, fading by 60 dB over the drawn time, at a drawn level up to that of the direct
  sound. Recordings of one source in two rooms.
- `low_pass`: the bands above a cut-off, drawn in the top `low_pass` fraction of the bands, fall by 60 dB over 4
  bands, no lower than the tile's quietest value: a microphone or a codec that drops the high end.
- `freq_mask` / `time_mask`: SpecAugment's masks (Park et al. 2019): a run of up to `freq_mask` adjacent mel bands,
  and a run of up to a `time_mask` fraction of the frames, set to the tile's mean level. What one band or one
  moment holds can then be missing, so the loss rewards what the rest of the tile still says.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def shift_bands(tiles: jax.Array, shifts: jax.Array) -> jax.Array:
  """tiles [B, T, M] with tile b moved up by shifts[b] mel bands (down when negative), the edge band repeated."""
  m = tiles.shape[-1]
  source = jnp.clip(jnp.arange(m)[None, :] - shifts[:, None], 0, m - 1)  # [B, M]
  return jnp.take_along_axis(tiles, source[:, None, :], axis=-1)


def mix_in_power(tiles: jax.Array, others: jax.Array, amounts: jax.Array) -> jax.Array:
  """log((1 - a) exp(x) + a exp(y)) per tile, in float32, returned in the tiles' dtype; amounts [B] in [0, 1)."""
  x, y = tiles.astype(jnp.float32), others.astype(jnp.float32)
  a = amounts.astype(jnp.float32)[:, None, None]
  top = jnp.maximum(x, y)  # log-sum-exp, stable for any level
  mixed = top + jnp.log((1 - a) * jnp.exp(x - top) + a * jnp.exp(y - top))
  return mixed.astype(tiles.dtype)


EQ_KNOTS = 5  # Bands whose gain `eq_db` draws; the curve is straight between them.
DB_TO_LOG = 0.05 * 2.302585092994046  # One decibel in the natural log of a magnitude (the front end's log-Mel).


def equalise(tiles: jax.Array, knot_db: jax.Array) -> jax.Array:
  """tiles [B, T, M] plus a per-tile gain curve over M bands through knot_db [B, K] decibels at K even bands."""
  m, k = tiles.shape[-1], knot_db.shape[-1]
  position = jnp.linspace(0.0, k - 1.0, m)  # each band's place between the knots
  low = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, k - 2)
  frac = position - low
  curve = knot_db[:, low] * (1 - frac) + knot_db[:, low + 1] * frac  # [B, M]
  return (tiles.astype(jnp.float32) + DB_TO_LOG * curve[:, None, :]).astype(tiles.dtype)


def stretch_time(tiles: jax.Array, lengths: jax.Array, offsets: jax.Array) -> jax.Array:
  """tiles [B, T, M], each a window of lengths[b] frames from offsets[b] (fractional, within the tile) resampled
  to T frames by linear interpolation; lengths T and offsets 0 give the tile back."""
  t = tiles.shape[1]
  step = (lengths - 1.0) / max(t - 1, 1)  # [B]
  source = jnp.clip(offsets[:, None] + step[:, None] * jnp.arange(t)[None, :], 0.0, t - 1.0)  # [B, T]
  low = jnp.clip(jnp.floor(source).astype(jnp.int32), 0, max(t - 2, 0))
  frac = (source - low)[:, :, None]
  x = tiles.astype(jnp.float32)
  before = jnp.take_along_axis(x, low[:, :, None], axis=1)
  after = jnp.take_along_axis(x, jnp.minimum(low + 1, t - 1)[:, :, None], axis=1)
  return (before * (1 - frac) + after * frac).astype(tiles.dtype)


LOW_PASS_SLOPE_BANDS = 4  # Bands over which `low_pass` falls by its full 60 dB.


def reverberate(tiles: jax.Array, decay: jax.Array, level: jax.Array) -> jax.Array:
  """tiles [B, T, M] (log magnitude) plus, in magnitude, level[b] times a tail of the earlier frames weighted by
  (1 - decay[b]) * decay[b] ** (lag in frames): a steady sound's tail is level[b] * decay[b] times the sound, never
  louder than it."""
  x = tiles.astype(jnp.float32)
  top = jnp.max(x, axis=(1, 2), keepdims=True)  # magnitudes relative to the tile's loudest, so exp never overflows
  magnitude = jnp.exp(x - top)
  lag = jnp.arange(x.shape[1])[:, None] - jnp.arange(x.shape[1])[None, :]  # [T, T]: frame t hears frame s
  d = decay.astype(jnp.float32)[:, None, None]
  weights = jnp.where(lag[None] >= 1, d ** jnp.maximum(lag[None], 1), 0.0) * (1 - d)  # [B, T, T]
  tail = jnp.einsum('bts,bsm->btm', weights, magnitude)
  out = top + jnp.log(magnitude + level.astype(jnp.float32)[:, None, None] * tail)
  return out.astype(tiles.dtype)


def cut_high_bands(tiles: jax.Array, cutoffs: jax.Array) -> jax.Array:
  """tiles [B, T, M] with the bands above cutoffs[b] (a fractional band) falling by 60 dB over LOW_PASS_SLOPE_BANDS
  bands, no lower than tile b's quietest value."""
  x = tiles.astype(jnp.float32)
  above = jnp.clip((jnp.arange(x.shape[-1])[None, :] - cutoffs[:, None]) / LOW_PASS_SLOPE_BANDS, 0.0, 1.0)
  floor = jnp.min(x, axis=(1, 2), keepdims=True)
  return jnp.maximum(x - 60 * DB_TO_LOG * above[:, None, :], floor).astype(tiles.dtype)


def mask_span(tiles: jax.Array, axis: int, starts: jax.Array, widths: jax.Array) -> jax.Array:
  """tiles [B, T, M] with positions starts[b] .. starts[b] + widths[b] - 1 along `axis` (1: frames, 2: bands) set to
  tile b's mean; a width of 0 leaves the tile as it was."""
  position = jnp.arange(tiles.shape[axis])[None, :]
  inside = (position >= starts[:, None]) & (position < (starts + widths)[:, None])  # [B, n]
  inside = inside[:, :, None] if axis == 1 else inside[:, None, :]
  mean = jnp.mean(tiles.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(tiles.dtype)
  return jnp.where(inside, mean, tiles)


def _draw_span(key, b: int, length: int, most: int) -> tuple[jax.Array, jax.Array]:
  """Per tile, a width of 0..most positions and a start that keeps the span inside `length`."""
  k_width, k_start = jax.random.split(key)
  widths = jax.random.randint(k_width, (b,), 0, most + 1)
  starts = jnp.floor(jax.random.uniform(k_start, (b,)) * (length - widths + 1)).astype(widths.dtype)
  return starts, widths


SETTINGS = ('freq_shift', 'mixup', 'eq_db', 'time_stretch', 'freq_mask', 'time_mask', 'reverb', 'low_pass')


def make_augment(freq_shift: int = 0, mixup: float = 0.0, eq_db: float = 0.0, time_stretch: float = 0.0,
                 freq_mask: int = 0, time_mask: float = 0.0, reverb: float = 0.0, low_pass: float = 0.0, *,
                 frame_rate: float = 100.0) -> Callable | None:
  """`augment(batch, rng) -> batch` over the roles' [B, T, M] tiles, or None when all are off.

  frame_rate: the tiles' frames per second (for `reverb`). Raises ValueError, naming the setting, for a negative
  shift, gain or time, or a fraction outside [0, 1).
  """
  for name, bands, example in (('freq_shift', freq_shift, 4), ('freq_mask', freq_mask, 16)):
    if int(bands) != bands or bands < 0:
      raise ValueError(f'config.data.augment.{name}={bands} must be a whole number of mel bands >= 0 '
                       f'(0: off; e.g. {example}).')
  for name, fraction, example in (('mixup', mixup, 0.4), ('time_stretch', time_stretch, 0.2),
                                  ('time_mask', time_mask, 0.2), ('low_pass', low_pass, 0.4)):
    if not 0.0 <= fraction < 1.0:
      raise ValueError(f'config.data.augment.{name}={fraction} must lie in [0, 1) (0: off; e.g. {example}).')
  if not 0.0 <= eq_db < float('inf'):
    raise ValueError(f'config.data.augment.eq_db={eq_db} must be a finite number of decibels >= 0 (0: off; e.g. 6).')
  if not 0.0 <= reverb < float('inf'):
    raise ValueError(f'config.data.augment.reverb={reverb} must be a finite reverberation time in seconds >= 0 '
                     '(0: off; e.g. 0.5).')
  freq_shift, freq_mask = int(freq_shift), int(freq_mask)
  if not (freq_shift or mixup or eq_db or time_stretch or freq_mask or time_mask or reverb or low_pass):
    return None

  def augment(batch: dict, rng) -> dict:
    out = {}
    for i, (role, tiles) in enumerate(sorted(batch.items())):
      k_shift, k_amount, k_other = jax.random.split(jax.random.fold_in(rng, i), 3)
      # The later settings' keys come from their own fold, so adding them leaves the first ones' draws as they were.
      k_eq, k_length, k_offset = jax.random.split(jax.random.fold_in(rng, 1000 + i), 3)
      k_band_mask, k_frame_mask = jax.random.split(jax.random.fold_in(rng, 2000 + i))
      k_rt60, k_level, k_cutoff = jax.random.split(jax.random.fold_in(rng, 3000 + i), 3)
      b, t, m = tiles.shape
      if time_stretch:
        lengths = t * jax.random.uniform(k_length, (b,), minval=1.0 - time_stretch, maxval=1.0)
        offsets = jax.random.uniform(k_offset, (b,)) * (t - lengths)
        tiles = stretch_time(tiles, lengths, offsets)
      if reverb:
        rt60 = jax.random.uniform(k_rt60, (b,), minval=1e-3, maxval=reverb)
        tiles = reverberate(tiles, 10.0 ** (-3.0 / (rt60 * frame_rate)), jax.random.uniform(k_level, (b,)))
      if mixup:
        amounts = jax.random.uniform(k_amount, (b,), maxval=mixup)
        # Another tile of the same role and batch: a rotation by 1..B-1, so never the tile itself.
        others = jnp.roll(tiles, jax.random.randint(k_other, (), 1, max(b, 2)), axis=0)
        tiles = mix_in_power(tiles, others, amounts)
      if freq_shift:
        tiles = shift_bands(tiles, jax.random.randint(k_shift, (b,), -freq_shift, freq_shift + 1))
      if eq_db:
        tiles = equalise(tiles, jax.random.uniform(k_eq, (b, EQ_KNOTS), minval=-eq_db, maxval=eq_db))
      if low_pass:
        tiles = cut_high_bands(tiles, jax.random.uniform(k_cutoff, (b,), minval=(1.0 - low_pass) * (m - 1),
                                                         maxval=m - 1.0))
      if freq_mask:
        tiles = mask_span(tiles, 2, *_draw_span(k_band_mask, b, m, min(freq_mask, m)))
      if time_mask:
        tiles = mask_span(tiles, 1, *_draw_span(k_frame_mask, b, t, int(time_mask * t)))
      out[role] = tiles
    return out

  return augment
