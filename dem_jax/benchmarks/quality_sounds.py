"""The quality suite's everyday-sounds task: what kind of sound it is, from recorded sound effects.

Material: the sound effects of the game 0 A.D. in the Debian package `0ad-data` (recorded animals, footsteps,
voices, weapons, impacts, tools, gathering, fire and ambiences; its music is left out), read from the package's
archive (public.zip) as they are. The kinds are the package's own folders, merged as KINDS says (the interface's
chimes, sieges, ships and gates are left out).

Every source file gives one clip, or, when longer than ITEM_SECONDS, up to MAX_EXCERPTS clips of ITEM_SECONDS spread
over it (an hour of rain would otherwise outweigh every other kind); files shorter than MIN_SECONDS are played
again until they fill it, so that every clip holds two 1-s tiles. Clips are mono at 16 kHz at a fixed loudness
(level is no cue). The label is the kind; the group is the source file, and the split is by source file (a seeded
TEST_FRACTION of each kind's files for test), so no recording is on both sides. On disk:
`<root>/audio/<kind>/<source>_<k>.wav` and `<root>/split.csv` (file, split, group).
"""

from __future__ import annotations

import csv
import io
import os
import zipfile
from typing import Callable

import numpy as np
import soundfile
import soxr

from dem_jax.benchmarks import quality_data
from dem_jax.benchmarks.quality_data import Package, QualityDataError

SAMPLE_RATE = 16000
ITEM_SECONDS = 10.0
MAX_EXCERPTS = 3
MIN_SECONDS = 2.0
TEST_FRACTION = 0.3
VERSION = 1  # Bump when the clips change, so that cached sets are rebuilt.
DEFAULT_MINUTES = 60.0

ARCHIVE = Package('0ad-data', '/usr/share/games/0ad/mods/public/public.zip')
# Kind: the folders of the archive (prefixes of member names) that hold it.
KINDS = {
    'animals': ('audio/actor/fauna/',),
    'footsteps': ('audio/actor/singlesteps/', 'audio/actor/human/movement/', 'audio/actor/mounted/mstep'),
    'voices': ('audio/actor/human/death/', 'audio/voice/'),
    'weapons': ('audio/attack/weapon/',),
    'impacts': ('audio/attack/impact/',),
    'tools': ('audio/resource/construction/', 'audio/resource/farming/', 'audio/resource/lumbering/',
              'audio/resource/mining/'),
    'gathering': ('audio/resource/gathering/', 'audio/resource/foraging/'),
    'fire': ('audio/attack/fire/',),
    'ambience': ('audio/ambient/',),
}
AUDIO_SUFFIXES = ('.ogg', '.wav', '.flac')


def kind_of(name: str) -> str | None:
  for kind, prefixes in KINDS.items():
    if name.startswith(prefixes):
      return kind
  return None


def archive_sources(path: str) -> dict[str, str]:
  """{member name: kind} of the archive's sound files that belong to a kind, sorted by name."""
  with zipfile.ZipFile(path) as archive:
    names = sorted(n for n in archive.namelist() if n.lower().endswith(AUDIO_SUFFIXES))
  return {n: kind for n in names if (kind := kind_of(n))}


class ArchiveReader:
  """Reads a member of the archive: (samples [n] mono float32 at its own rate, rate)."""

  def __init__(self, path: str):
    self.archive = zipfile.ZipFile(path)

  def __call__(self, name: str) -> tuple[np.ndarray, int]:
    audio, rate = soundfile.read(io.BytesIO(self.archive.read(name)), dtype='float32', always_2d=True)
    return audio.mean(axis=1), rate


def excerpts(samples: np.ndarray, rate: int, item_seconds: float = ITEM_SECONDS, max_excerpts: int = MAX_EXCERPTS,
             min_seconds: float = MIN_SECONDS) -> list[np.ndarray]:
  """The clips of one source file (see the module docstring)."""
  item, shortest = int(round(item_seconds * rate)), int(round(min_seconds * rate))
  if len(samples) == 0:
    return []
  if len(samples) <= item:
    if len(samples) < shortest:
      samples = np.tile(samples, -(-shortest // len(samples)))[:shortest]
    return [samples]
  count = min(max_excerpts, len(samples) // item)
  starts = np.linspace(0, len(samples) - item, count).round().astype(int)
  return [samples[s:s + item] for s in starts]


def files_per_kind(sources: dict[str, str], minutes: float) -> dict[str, str]:
  """At full size every source; smaller (`minutes` below DEFAULT_MINUTES), that share of each kind's files, taken
  in a fixed order, at least 4 per kind."""
  if minutes >= DEFAULT_MINUTES:
    return dict(sources)
  kept = {}
  for kind in sorted(set(sources.values())):
    names = [n for n, k in sources.items() if k == kind]
    count = max(4, int(round(len(names) * minutes / DEFAULT_MINUTES)))
    order = np.random.default_rng(0).permutation(len(names))
    kept |= {names[i]: kind for i in sorted(order[:count])}
  return dict(sorted(kept.items()))


def settings(minutes: float = DEFAULT_MINUTES) -> dict:
  return {'version': VERSION, 'sample_rate': SAMPLE_RATE, 'item_seconds': ITEM_SECONDS,
          'max_excerpts': MAX_EXCERPTS, 'min_seconds': MIN_SECONDS, 'test_fraction': TEST_FRACTION,
          'target_rms': quality_data.TARGET_RMS, 'kinds': {k: list(v) for k, v in KINDS.items()},
          'minutes': min(minutes, DEFAULT_MINUTES), 'archive': ARCHIVE.pattern}


def source_stem(name: str) -> str:
  """A file name for a member: its path below audio/, folders joined by '-', without the suffix."""
  return os.path.splitext(name.removeprefix('audio/'))[0].replace('/', '-')


def build(root: str, *, minutes: float = DEFAULT_MINUTES, sources: dict[str, str] | None = None,
          read: Callable[[str], tuple[np.ndarray, int]] | None = None, config: dict | None = None,
          install: bool = True, log: Callable[[str], None] = print) -> dict:
  """Writes the set under `root` unless an identical one is there; returns the contents of root/build.json.

  `sources` ({name: kind}) and `read` (name -> (samples, rate)) default to the packaged archive (installed first if
  missing); passing them builds the same layout from other material. Raises quality_data.MissingMaterialError
  naming the package when it is missing.
  """
  config = config or settings(minutes)
  cached = quality_data.cached_build(root, config, log)
  if cached is not None:
    return cached
  if sources is None:
    quality_data.ensure_material(install, [ARCHIVE], python_requirements={}, name='everyday-sounds set')
    sources = archive_sources(ARCHIVE.pattern)
    read = read or ArchiveReader(ARCHIVE.pattern)
  sources = files_per_kind(sources, config['minutes'])
  if len(set(sources.values())) < 2:
    raise QualityDataError(f'sounds of {len(set(sources.values()))} kind(s) found; the set needs two or more.')
  test = set()
  for kind in sorted(set(sources.values())):
    test |= quality_data.test_tunes([n for n, k in sources.items() if k == kind], config['test_fraction'])
  rows, seconds, silent = [], 0.0, []
  for n, (name, kind) in enumerate(sources.items()):
    samples, rate = read(name)
    if rate != config['sample_rate']:
      samples = soxr.resample(samples, rate, config['sample_rate'], quality='HQ').astype(np.float32)
    clips = excerpts(samples, config['sample_rate'], config['item_seconds'], config['max_excerpts'],
                     config['min_seconds'])
    os.makedirs(os.path.join(root, 'audio', kind), exist_ok=True)
    for k, clip in enumerate(clips):
      try:
        clip = quality_data.at_loudness(clip, config['target_rms'])
      except QualityDataError:
        silent.append(f'{name}#{k}')  # A silent stretch of a recording: no clip.
        continue
      file = f'{kind}/{source_stem(name)}_{k}.wav'
      soundfile.write(os.path.join(root, 'audio', file), clip, config['sample_rate'], subtype='PCM_16')
      seconds += len(clip) / config['sample_rate']
      rows.append({'file': file, 'split': 'test' if name in test else 'train', 'group': name})
    if (n + 1) % 100 == 0 or n + 1 == len(sources):
      log(f'[{n + 1}/{len(sources)}] source files read')
  with open(os.path.join(root, 'split.csv'), 'w', newline='', encoding='utf-8') as f:
    writer = csv.DictWriter(f, fieldnames=['file', 'split', 'group'])
    writer.writeheader()
    writer.writerows(rows)
  built = {'settings': config, 'files': len(rows), 'sources': len(sources), 'silent_excerpts': silent,
           'test_sources': sorted(test), 'audio_seconds': round(seconds, 1),
           'labels': sorted({r['file'].split('/', 1)[0] for r in rows})}
  quality_data.write_build(root, built)
  return built
