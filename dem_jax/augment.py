"""Label-free augmentations of log-Mel training tiles, drawn on the device inside the train step (off by default).

Each tile of a triplet gets its own draw, so the anchor and its neighbour differ by more than their time offset and
the loss rewards what survives the change:
- `freq_shift`: the tile moves by a whole number of mel bands, up to +-freq_shift (the edge band repeats). The
  sound's register changes while its spectral shape stays, so the absolute pitch of a melody tells less.
- `mixup`: a random fraction, up to `mixup`, of another tile of the batch is added, in power, not in log:
  log((1 - a) * exp(x) + a * exp(y)) (BYOL-A's mixing). A background of other sound, as recordings have.
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


def make_augment(freq_shift: int = 0, mixup: float = 0.0) -> Callable | None:
  """`augment(batch, rng) -> batch` over the roles' [B, T, M] tiles, or None when both are off.

  Raises ValueError, naming the setting, for a negative shift or a mixing fraction outside [0, 1).
  """
  if int(freq_shift) != freq_shift or freq_shift < 0:
    raise ValueError(f'config.data.augment.freq_shift={freq_shift} must be a whole number of mel bands >= 0 '
                     '(0: off; e.g. 4).')
  if not 0.0 <= mixup < 1.0:
    raise ValueError(f'config.data.augment.mixup={mixup} must lie in [0, 1) (0: off; e.g. 0.4).')
  freq_shift = int(freq_shift)
  if not freq_shift and not mixup:
    return None

  def augment(batch: dict, rng) -> dict:
    out = {}
    for i, (role, tiles) in enumerate(sorted(batch.items())):
      k_shift, k_amount, k_other = jax.random.split(jax.random.fold_in(rng, i), 3)
      b = tiles.shape[0]
      if mixup:
        amounts = jax.random.uniform(k_amount, (b,), maxval=mixup)
        # Another tile of the same role and batch: a rotation by 1..B-1, so never the tile itself.
        others = jnp.roll(tiles, jax.random.randint(k_other, (), 1, max(b, 2)), axis=0)
        tiles = mix_in_power(tiles, others, amounts)
      if freq_shift:
        tiles = shift_bands(tiles, jax.random.randint(k_shift, (b,), -freq_shift, freq_shift + 1))
      out[role] = tiles
    return out

  return augment
