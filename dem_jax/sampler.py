"""Temporal-proximity triplets: (anchor, neighbour within +-W seconds of it, distant tile of another recording).

The sampler works on "timelines": stretches of audio that are continuous in time. A timeline is one clip, or, with
`cross_clip_neighbours`, a chain of clips of one recording whose positions follow each other (DCASE's consecutive
10-s segments of a node and session), so a neighbour may lie across a clip boundary. Anchors start anywhere in a
timeline (not only on a grid), uniformly over all possible tile positions. Distant tiles come from another
recording, or, with `distant_other_group`, from another group (DCASE session: the 4 nodes of one session hear the
same moment, so another node is no "distant" tile).

A batch is a pure function of (seed, step): a resumed run sees the same batches, and every process of a multi-host
run agrees on the global batch while reading only its own share.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from dem_jax.features import Clip, Features


class SamplerError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Timeline:
  clips: tuple[Clip, ...]
  starts: tuple[int, ...]  # Frame where each clip begins within the timeline.
  length: int
  recording: str
  group: str


@dataclasses.dataclass
class Triplets:
  """Tile start positions of one batch: [B] timeline indices and [B] frame positions per role."""
  anchor: tuple[np.ndarray, np.ndarray]
  neighbour: tuple[np.ndarray, np.ndarray]
  distant: tuple[np.ndarray, np.ndarray]


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


class TripletSampler:
  """Draws triplets of tile positions from a set of clips.

  Args:
    clips: the clips to draw from (e.g. `features.select(features.train_splits(fold))`).
    tile_frames: frames per tile (498 for 5 s at 100 frames/s).
    neighbour_frames: a neighbour starts at most this many frames before or after its anchor.
    cross_clip_neighbours: neighbours may cross into the next/previous clip of the same recording.
    distant_other_group: distant tiles come from another group (session), not only another recording.
    seed: with the step, fixes every batch.
  """

  def __init__(self, clips: list[Clip], *, tile_frames: int, neighbour_frames: int, cross_clip_neighbours: bool = True,
               distant_other_group: bool = True, seed: int = 0):
    if tile_frames <= 0:
      raise SamplerError(f'tile_frames={tile_frames} must be positive.')
    self.tile_frames, self.neighbour_frames, self.seed = tile_frames, neighbour_frames, seed
    self.distant_other_group = distant_other_group
    all_timelines = build_timelines(clips, cross_clip_neighbours)
    self.timelines = [t for t in all_timelines if t.length >= tile_frames]
    self.skipped = [c.clip_id for t in all_timelines if t.length < tile_frames for c in t.clips]
    if not self.timelines:
      longest = max((t.length for t in all_timelines), default=0)
      raise SamplerError(
          f'The tile ({tile_frames} frames) is longer than every recording (longest: {longest} frames, '
          f'{len(clips)} clips). Shorten config.data.tile_seconds, or enable config.data.cross_clip_neighbours for '
          'data cut into consecutive clips.')
    self.valid = np.array([t.length - tile_frames + 1 for t in self.timelines], dtype=np.int64)
    self.cumulative = np.cumsum(self.valid)
    key = (lambda t: t.group) if distant_other_group else (lambda t: t.recording)
    names = sorted({key(t) for t in self.timelines})
    self.owner = np.array([names.index(key(t)) for t in self.timelines])  # Who a distant tile must not share.
    if len(names) < 2:
      what = 'group (session)' if distant_other_group else 'recording'
      raise SamplerError(f'Distant tiles need a second {what}, but all {len(clips)} clips share one. Add recordings'
                         + (', or set config.data.distant_other_group=False.' if distant_other_group else '.'))

  def _uniform_positions(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n tile starts drawn uniformly over every possible position of every timeline."""
    u = rng.integers(0, self.cumulative[-1], size=n)
    timeline = np.searchsorted(self.cumulative, u, side='right')
    position = u - (self.cumulative[timeline] - self.valid[timeline])
    return timeline, position

  def sample(self, step: int, batch_size: int) -> Triplets:
    rng = np.random.default_rng([self.seed, step])
    a_tl, a_pos = self._uniform_positions(rng, batch_size)
    # Neighbour: uniform over [a - W, a + W] within the timeline, excluding the anchor's own position.
    lo = np.maximum(a_pos - self.neighbour_frames, 0)
    hi = np.minimum(a_pos + self.neighbour_frames, self.valid[a_tl] - 1)
    span = hi - lo  # Positions other than the anchor's.
    offset = np.floor(rng.random(batch_size) * np.maximum(span, 1)).astype(np.int64)
    n_pos = lo + offset
    n_pos = np.where(n_pos >= a_pos, n_pos + 1, n_pos)
    n_pos = np.where(span == 0, a_pos, n_pos)  # A timeline exactly one tile long: the anchor is its own neighbour.
    # Distant: uniform over all positions of timelines with another owner; redraw the few that collide.
    d_tl, d_pos = self._uniform_positions(rng, batch_size)
    clash = self.owner[d_tl] == self.owner[a_tl]
    while clash.any():
      d_tl[clash], d_pos[clash] = self._uniform_positions(rng, int(clash.sum()))
      clash = self.owner[d_tl] == self.owner[a_tl]
    return Triplets((a_tl, a_pos), (a_tl, n_pos), (d_tl, d_pos))

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


def read_tiles(features: Features, sampler: TripletSampler, timelines: np.ndarray, positions: np.ndarray
               ) -> np.ndarray:
  """[len(positions), tile_frames, n_mels] float32 tiles, read concurrently through tensorstore."""
  requests, owners = [], []
  for i, (tl, pos) in enumerate(zip(timelines, positions)):
    for piece in sampler.pieces(int(tl), int(pos)):
      requests.append(piece)
      owners.append(i)
  parts = features.read_many(requests)
  out = np.empty((len(positions), sampler.tile_frames, features.n_mels), dtype=np.float32)
  fill = np.zeros(len(positions), dtype=np.int64)
  for i, part in zip(owners, parts):
    out[i, fill[i]:fill[i] + part.shape[0]] = part
    fill[i] += part.shape[0]
  return out
