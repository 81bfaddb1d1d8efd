"""Temporal-proximity triplets: (anchor, neighbour within +-W frames of it, distant tile of another recording).

The sampler works on "timelines": stretches of audio that are continuous in time. A timeline is one clip, or, with
`cross_clip_neighbours`, a chain of clips of one recording whose positions follow each other (DCASE's consecutive
10-s segments of a node and session), so a neighbour may lie across a clip boundary. Anchors start anywhere in a
timeline (not only on a grid), uniformly over all possible tile positions. Distant tiles come from another
recording, or, with `distant_other_group`, from another group (DCASE session: the 4 nodes of one session hear the
same moment, so another node is no "distant" tile).

Timelines are laid end to end in a packed feature array (`input_pipeline.pack_timelines`), so every tile is one
contiguous slice of rows. The draw itself, `sample_triplets`, is a jax function of small tables (`SamplerTables`)
and a key: the trainer runs it inside the compiled step when the packed features live on the device, and on the
host's CPU when they stream from host memory, so both stores give a step the same tiles for the same (seed, step).
It has no rejection loop: timelines are ordered by their owner (the group or recording a distant tile must not
share), so "every position of another owner" is the whole position range less one interval, drawn in one go.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dem_jax.features import Clip

ROLES = ('anchor', 'neighbour', 'distant')
_INT32_MAX = np.iinfo(np.int32).max


class SamplerError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Timeline:
  clips: tuple[Clip, ...]
  starts: tuple[int, ...]  # Frame where each clip begins within the timeline.
  length: int
  recording: str
  group: str


class SamplerTables(NamedTuple):
  """What `sample_triplets` needs, one int32 entry per timeline (a pytree: it can live on the device).

  Positions are numbered across all timelines: timeline t owns [cumulative[t] - valid[t], cumulative[t]).
  """
  row_offset: np.ndarray  # First row of the timeline in the packed features.
  valid: np.ndarray  # Anchor positions in the timeline: length - tile_frames + 1.
  cumulative: np.ndarray  # Inclusive running sum of `valid`.
  owner_lo: np.ndarray  # Position range of every timeline of this timeline's owner ...
  owner_hi: np.ndarray  # ... which distant tiles avoid.


def build_timelines(clips: list[Clip], cross_clip: bool) -> list[Timeline]:
  ordered = sorted(clips, key=lambda c: (c.recording, c.position, c.clip_id))
  chains: list[list[Clip]] = []
  for clip in ordered:
    prev = chains[-1][-1] if chains else None
    if cross_clip and prev is not None and prev.recording == clip.recording and clip.position == prev.position + 1:
      chains[-1].append(clip)
    else:
      chains.append([clip])
  timelines = []
  for chain in chains:
    starts = tuple(itertools.accumulate((c.num_frames for c in chain[:-1]), initial=0))
    timelines.append(Timeline(tuple(chain), starts, starts[-1] + chain[-1].num_frames, chain[0].recording,
                              chain[0].group))
  return timelines


def window_tables(valid: np.ndarray, owner_ids: np.ndarray, row_offset: np.ndarray, *, size: int | None = None,
                  what: str = 'the window', fix: str = 'lower config.data.resident_gb') -> SamplerTables:
  """`SamplerTables` (int32) over timelines whose owners `owner_ids` are non-decreasing, padded to `size` entries.

  Padding entries own no position (valid 0), so no draw lands on them: one compiled draw serves every window of a
  streamed store, whatever its count of timelines.
  """
  valid = np.asarray(valid, np.int64)
  cumulative = np.cumsum(valid)
  total = int(cumulative[-1]) if len(cumulative) else 0
  ends = int(np.max(np.asarray(row_offset) + valid)) if len(valid) else 0
  if max(total, ends) > _INT32_MAX:
    raise SamplerError(f'{what} are more than the sampler indexes (2**31 - 1 frames); {fix}.')
  first = cumulative - valid
  owner_lo, owner_hi = np.empty_like(valid), np.empty_like(valid)
  for _, members in itertools.groupby(range(len(valid)), key=lambda i: owner_ids[i]):
    members = list(members)
    owner_lo[members], owner_hi[members] = first[members[0]], cumulative[members[-1]]
  columns = [np.asarray(row_offset, np.int64), valid, cumulative, owner_lo, owner_hi]
  if size is not None:
    pad = size - len(valid)
    columns = [np.concatenate([c, np.full(pad, total if name == 'cumulative' else 0, np.int64)])
               for name, c in zip(SamplerTables._fields, columns)]
  return SamplerTables(*(np.asarray(c, np.int32) for c in columns))


def sample_triplets(tables: SamplerTables, key: jax.Array, batch_size: int, neighbour_frames: int
                    ) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{role: ([B] timeline, [B] start position)} for one batch; jax ops only, so it runs on any device and jits.

  Anchor: uniform over every tile position of every timeline. Neighbour: uniform over the positions within
  +-neighbour_frames of the anchor in the same timeline, the anchor's own excluded (a timeline exactly one tile long
  gives the anchor itself). Distant: uniform over every position of every timeline of another owner.
  """
  k_anchor, k_neighbour, k_distant = jax.random.split(key, 3)
  cumulative, valid = tables.cumulative, tables.valid

  def locate(u):
    timeline = jnp.searchsorted(cumulative, u, side='right').astype(jnp.int32)
    return timeline, u - (cumulative[timeline] - valid[timeline])

  a_tl, a_pos = locate(jax.random.randint(k_anchor, (batch_size,), 0, cumulative[-1], dtype=jnp.int32))
  lo = jnp.maximum(a_pos - neighbour_frames, 0)
  hi = jnp.minimum(a_pos + neighbour_frames, valid[a_tl] - 1)
  span = hi - lo  # Positions other than the anchor's.
  n_pos = lo + jax.random.randint(k_neighbour, (batch_size,), 0, jnp.maximum(span, 1), dtype=jnp.int32)
  n_pos = jnp.where(n_pos >= a_pos, n_pos + 1, n_pos)
  n_pos = jnp.where(span == 0, a_pos, n_pos)
  # Distant: a position among the others' (the total less the owner's interval), then step over that interval.
  owner_lo, owner_hi = tables.owner_lo[a_tl], tables.owner_hi[a_tl]
  v = jax.random.randint(k_distant, (batch_size,), 0, cumulative[-1] - (owner_hi - owner_lo), dtype=jnp.int32)
  d_tl, d_pos = locate(jnp.where(v >= owner_lo, v + (owner_hi - owner_lo), v))
  return {'anchor': (a_tl, a_pos), 'neighbour': (a_tl, n_pos), 'distant': (d_tl, d_pos)}


def triplet_rows(tables: SamplerTables, key: jax.Array, batch_size: int, neighbour_frames: int
                 ) -> dict[str, jax.Array]:
  """{role: [B] first row of each tile in the packed features}."""
  triplets = sample_triplets(tables, key, batch_size, neighbour_frames)
  return {role: tables.row_offset[tl] + pos for role, (tl, pos) in triplets.items()}


class TripletSampler:
  """Timelines of a set of clips, their packed layout, and the tables that draw triplets from them.

  Args:
    clips: the clips to draw from (e.g. `features.select(features.train_splits(fold))`).
    tile_frames: frames per tile (498 for 5 s at 100 frames/s).
    neighbour_frames: a neighbour starts at most this many frames before or after its anchor.
    cross_clip_neighbours: neighbours may cross into the next/previous clip of the same recording.
    distant_other_group: distant tiles come from another group (session), not only another recording.
    seed: with the step, fixes every batch (`sample`, and the trainer's `data_key`).
  """

  def __init__(self, clips: list[Clip], *, tile_frames: int, neighbour_frames: int, cross_clip_neighbours: bool = True,
               distant_other_group: bool = True, seed: int = 0):
    if tile_frames <= 0:
      raise SamplerError(f'tile_frames={tile_frames} must be positive.')
    self.tile_frames, self.neighbour_frames, self.seed = tile_frames, neighbour_frames, seed
    self.distant_other_group = distant_other_group
    all_timelines = build_timelines(clips, cross_clip_neighbours)
    owner = (lambda t: t.group) if distant_other_group else (lambda t: t.recording)
    # Ordered by owner, so that each owner's positions form one interval (see sample_triplets).
    usable = sorted((t for t in all_timelines if t.length >= tile_frames),
                    key=lambda t: (owner(t), t.recording, t.clips[0].position))
    self.timelines = usable
    self.skipped = [c.clip_id for t in all_timelines if t.length < tile_frames for c in t.clips]
    if not usable:
      longest = max((t.length for t in all_timelines), default=0)
      raise SamplerError(
          f'The tile ({tile_frames} frames) is longer than every recording (longest: {longest} frames, '
          f'{len(clips)} clips). Shorten config.data.tile_seconds, or enable config.data.cross_clip_neighbours for '
          'data cut into consecutive clips.')
    owners = [owner(t) for t in usable]
    if len(set(owners)) < 2:
      what = 'group (session)' if distant_other_group else 'recording'
      raise SamplerError(f'Distant tiles need a second {what}, but all {len(clips)} clips share one. Add recordings'
                         + (', or set config.data.distant_other_group=False.' if distant_other_group else '.'))
    # Each timeline's owner as an integer, in timeline order (non-decreasing): the streamed store's tables use it.
    self.owner_ids = np.cumsum([0] + [a != b for a, b in zip(owners, owners[1:])]).astype(np.int64)
    self.lengths = np.array([t.length for t in usable], dtype=np.int64)
    self.valid = self.lengths - tile_frames + 1
    self.total_frames = int(self.lengths.sum())
    # The key whose fold_in with the step draws that step's batch, on any device (in the step, or `rows`).
    self.data_key = jax.random.fold_in(jax.random.key(seed), 0x7E1E)
    self._tables = None
    self._host = None

  @property
  def tables(self) -> SamplerTables:
    """The tables over the whole packed split, built on first use: only the packed stores index the whole split
    (in int32), so only they refuse one of more than 2**31 - 1 frames; the streamed store indexes a window."""
    if self._tables is None:
      self._tables = window_tables(self.valid, self.owner_ids, np.concatenate([[0], np.cumsum(self.lengths)[:-1]]),
                                   what=f'{self.total_frames} frames of the packed split', fix=(
                                       "use config.data.store='stream' (or 'auto'), which indexes a window of the "
                                       'split, or train on a subset (config.data.fold)'))
    return self._tables

  def sample(self, step: int, batch_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The batch of `step` as numpy {role: ([B] timeline, [B] position)}, computed on the host's CPU."""
    return jax.tree.map(np.asarray, _sample_on_host(*self._on_host(), step, batch_size, self.neighbour_frames))

  def rows(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
    """The batch of `step` as numpy {role: [B] first row in the packed features}, computed on the host's CPU."""
    return jax.tree.map(np.asarray, _rows_on_host(*self._on_host(), step, batch_size, self.neighbour_frames))

  def _on_host(self):
    """The tables and the data key on this process's CPU, placed once (the host store draws every step)."""
    if self._host is None:
      self._host = jax.device_put((self.tables, self.data_key), jax.local_devices(backend='cpu')[0])
    return self._host

  def pieces(self, timeline: int, position: int) -> list[tuple[str, int, int]]:
    """(clip_id, start, stop) slices whose concatenation is the tile at `position` of `timeline`."""
    t = self.timelines[timeline]
    end = position + self.tile_frames
    out = []
    for clip, start in zip(t.clips, t.starts):
      lo, hi = max(position, start), min(end, start + clip.num_frames)
      if lo < hi:
        out.append((clip.clip_id, lo - start, hi - start))
    return out

  def steps_per_epoch(self, batch_size: int) -> int:
    """Steps that draw as many anchors as there are non-overlapping tiles (the original's epoch)."""
    tiles = int(sum(t.length // self.tile_frames for t in self.timelines))
    return max(1, tiles // batch_size)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _sample_on_host(tables, data_key, step, batch_size, neighbour_frames):
  return sample_triplets(tables, jax.random.fold_in(data_key, step), batch_size, neighbour_frames)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _rows_on_host(tables, data_key, step, batch_size, neighbour_frames):
  return triplet_rows(tables, jax.random.fold_in(data_key, step), batch_size, neighbour_frames)
