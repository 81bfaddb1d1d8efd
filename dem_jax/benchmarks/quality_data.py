"""The quality benchmark's data: real tunes played by real sampled instruments, labelled by instrument family.

Material, all from Debian packages (the builder installs them when run as root):
- tunes: the MIDI files of `openttd-openmsx` (31 tunes) and `planetblupi-music-midi` (10 tunes), human-composed
  multi-part music in many styles;
- instruments: the FluidR3 General MIDI SoundFont of `fluid-soundfont-gm`, recorded samples of real instruments.
Rendering needs two Python packages that dem_jax does not depend on: `mido` (MIDI parsing) and `tinysoundfont`
(the SoundFont synthesizer; installed with --no-deps, since its PyAudio dependency is only for live playback).

Each tune gives WINDOWS excerpts of ITEM_SECONDS; every excerpt is rendered once per instrument family, all its
pitched parts on one program of that family (drawn per excerpt, so a class is a family, not one preset), drums left
out, at a fixed loudness (so level is no cue). The label is the family; the group is the tune, and the split is by
tune, so no melody is in both train and test, and every class holds the same melodies: only the timbre tells the
classes apart. On disk, GTZAN-style: `<root>/audio/<family>/<tune>_<window>.wav` and `<root>/split.csv` with columns
file, split, group, program (preprocess with --dataset=folder --split_file=<root>/split.csv).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zlib
from typing import Callable, Sequence

import numpy as np
import soundfile

SAMPLE_RATE = 16000
ITEM_SECONDS = 10.0
WINDOWS = (0.2, 0.55)  # Excerpt starts, as fractions of the tune's length: past the intro, before the ending.
MIN_NOTES = 20  # An excerpt with fewer pitched notes (a pause, a drum break) is left out in every family.
TARGET_RMS = 0.05  # About -26 dBFS.
TEST_FRACTION = 0.3
VERSION = 1  # Bump when the rendering changes, so that cached sets are rebuilt.
DRUM_CHANNEL = 9

# General MIDI programs (0-based) of each family; odd members (clavinet, accordion, ethnic pipes) are left out.
FAMILIES = {
    'piano': (0, 1, 2, 4, 5, 6),
    'organ': (16, 17, 18, 19, 20),
    'guitar': (24, 25, 26, 27, 28),
    'strings': (40, 41, 42, 48, 49),
    'brass': (56, 57, 58, 60, 61),
    'woodwind': (64, 65, 66, 68, 70, 71, 73, 74),
}


@dataclasses.dataclass(frozen=True)
class Package:
  """A Debian package and the files of it that the set needs."""
  name: str
  pattern: str  # A glob of the files used.


TUNES = (Package('openttd-openmsx', '/usr/share/games/openttd/baseset/openmsx/*.mid'),
         Package('planetblupi-music-midi', '/usr/share/planetblupi/music/*.mid'))
SOUNDFONT = Package('fluid-soundfont-gm', '/usr/share/sounds/sf2/FluidR3_GM.sf2')
PYTHON_REQUIREMENTS = {'mido': 'mido==1.3.3', 'tinysoundfont': 'tinysoundfont==0.3.7'}


class QualityDataError(RuntimeError):
  """The set cannot be built; the message says what to install or change."""


class MissingMaterialError(QualityDataError):
  """Packages a set needs are missing and were not installed; `packages` names them (the suite skips that task)."""

  def __init__(self, message: str, packages: Sequence[str]):
    super().__init__(message)
    self.packages = list(packages)


def _missing_packages(packages: Sequence[Package]) -> list[Package]:
  return [p for p in packages if not glob.glob(p.pattern)]


def ensure_material(install: bool = True, packages: Sequence[Package] = TUNES + (SOUNDFONT,),
                    python_requirements: dict[str, str] | None = None, name: str = 'quality set') -> None:
  """Makes sure the Debian packages and Python modules are there; installs them if allowed and possible.

  apt-get runs only as root; pip installs into this interpreter. `python_requirements` ({module: pip requirement})
  defaults to this set's; `name` is the set's name in the messages. Raises MissingMaterialError naming the commands.
  """
  python_requirements = PYTHON_REQUIREMENTS if python_requirements is None else python_requirements
  missing = _missing_packages(packages)
  if missing and install and os.geteuid() == 0:
    names = sorted({p.name for p in missing})
    print(f'{name}: installing the Debian packages {" ".join(names)} (apt-get install, as root); '
          '--no_install refuses instead.', file=sys.stderr, flush=True)
    for cmd in (['apt-get', 'update', '-qq'], ['apt-get', 'install', '-y', '-qq', *names]):
      subprocess.run(cmd, check=False, env=os.environ | {'DEBIAN_FRONTEND': 'noninteractive'},
                     stdout=subprocess.DEVNULL)
    missing = _missing_packages(missing)
  if missing:
    names = sorted({p.name for p in missing})
    raise MissingMaterialError(
        f'the {name} needs the Debian packages {", ".join(names)} (not found: '
        f'{", ".join(p.pattern for p in missing)}); install them with `sudo apt-get install '
        f'{" ".join(names)}`.', names)
  modules = [m for m in python_requirements if importlib.util.find_spec(m) is None]
  if modules and install:
    print(f'{name}: installing the Python packages {" ".join(python_requirements[m] for m in modules)} (pip, '
          'into this environment); --no_install refuses instead.', file=sys.stderr, flush=True)
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps',
                    *[python_requirements[m] for m in modules]], check=False)
    importlib.invalidate_caches()
    modules = [m for m in modules if importlib.util.find_spec(m) is None]
  if modules:
    reqs = ' '.join(python_requirements[m] for m in modules)
    raise MissingMaterialError(f'the {name} needs the Python packages {reqs}; install them with '
                               f'`{sys.executable} -m pip install --no-deps {reqs}`.', modules)


def tune_paths(packages: Sequence[Package] = TUNES) -> dict[str, str]:
  """{tune name: MIDI path}, sorted; a tune is named <package>-<file stem>."""
  tunes = {}
  for p in packages:
    for path in sorted(glob.glob(p.pattern)):
      tunes[f'{p.name}-{os.path.splitext(os.path.basename(path))[0]}'] = path
  return dict(sorted(tunes.items()))


# A MIDI event in absolute seconds: (time, kind, channel, a, b) with kind one of 'note_on', 'note_off',
# 'control_change', 'pitchwheel'; a, b are the message's two data values.
Event = tuple[float, str, int, int, int]


def midi_events(path: str) -> list[Event]:
  """The pitched parts of a MIDI file as timed events (tempo changes applied by mido; drums and programs dropped)."""
  import mido  # pylint: disable=import-outside-toplevel  # Needed only to build the set.
  events, now = [], 0.0
  for msg in mido.MidiFile(path):
    now += msg.time
    if msg.is_meta or getattr(msg, 'channel', DRUM_CHANNEL) == DRUM_CHANNEL:
      continue
    if msg.type == 'note_on':
      events.append((now, 'note_on', msg.channel, msg.note, msg.velocity))
    elif msg.type == 'note_off':
      events.append((now, 'note_off', msg.channel, msg.note, 0))
    elif msg.type == 'control_change':
      events.append((now, 'control_change', msg.channel, msg.control, msg.value))
    elif msg.type == 'pitchwheel':
      events.append((now, 'pitchwheel', msg.channel, msg.pitch + 8192, 0))
  return events


def excerpt_starts(events: Sequence[Event], seconds: float = ITEM_SECONDS, windows: Sequence[float] = WINDOWS,
                   min_notes: int = MIN_NOTES) -> list[float]:
  """Start times of the excerpts of a tune: one per window fraction, kept if it holds at least min_notes notes."""
  onsets = np.array([t for t, kind, _, _, velocity in events if kind == 'note_on' and velocity > 0])
  if onsets.size == 0:
    return []
  starts = []
  for fraction in windows:
    start = round(float(onsets.max()) * fraction, 3)
    if np.sum((onsets >= start) & (onsets < start + seconds)) >= min_notes:
      starts.append(start)
  return starts


class SoundFontRenderer:
  """Plays timed events on one program of a SoundFont, offline, into mono float32 at SAMPLE_RATE."""

  def __init__(self, soundfont: str, sample_rate: int = SAMPLE_RATE):
    import tinysoundfont  # pylint: disable=import-outside-toplevel  # Needed only to build the set.
    self._tinysoundfont = tinysoundfont
    self.soundfont = soundfont
    self.sample_rate = sample_rate

  def __call__(self, events: Sequence[Event], program: int, start: float, seconds: float) -> np.ndarray:
    synth = self._tinysoundfont.Synth(samplerate=self.sample_rate)
    sfid = synth.sfload(self.soundfont)
    for channel in range(16):
      if channel != DRUM_CHANNEL:
        synth.program_select(channel, sfid, 0, program)
    end = start + seconds
    chunks, now = [], 0.0
    # Everything before the excerpt is played too (and dropped), so notes and controllers that carry into it sound
    # as in the whole tune.
    for t, kind, channel, a, b in list(events) + [(end, 'end', 0, 0, 0)]:
      t = min(t, end)
      frames = int(round(t * self.sample_rate)) - int(round(now * self.sample_rate))
      if frames > 0:
        chunks.append(np.frombuffer(synth.generate(frames), np.float32).reshape(-1, 2).mean(axis=1))
        now = t
      if kind == 'end' or t >= end:
        break
      if kind == 'note_on':
        synth.noteon(channel, a, b)
      elif kind == 'note_off':
        synth.noteoff(channel, a)
      elif kind == 'control_change':
        synth.control_change(channel, a, b)
      elif kind == 'pitchwheel':
        synth.pitchbend(channel, a)
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return audio[int(round(start * self.sample_rate)):][:int(round(seconds * self.sample_rate))]


def at_loudness(audio: np.ndarray, rms: float = TARGET_RMS) -> np.ndarray:
  """`audio` scaled to the given RMS, then limited to +-0.99 so that the 16-bit file does not wrap."""
  level = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0
  if level < 1e-6:
    raise QualityDataError('an excerpt rendered to silence; the SoundFont or the MIDI file is not as expected.')
  return np.clip(audio * (rms / level), -0.99, 0.99).astype(np.float32)


def program_for(tune: str, window: int, family: str) -> int:
  """The family member that plays an excerpt: a fixed function of the excerpt, so rebuilds give the same set."""
  programs = FAMILIES[family]
  return programs[zlib.crc32(f'{tune}/{window}/{family}'.encode()) % len(programs)]


def test_tunes(tunes: Sequence[str], fraction: float = TEST_FRACTION, seed: int = 0) -> set[str]:
  """The tunes of the test part: a seeded draw of round(fraction * n), at least one, from the sorted names."""
  order = np.random.default_rng(seed).permutation(len(tunes))
  count = max(1, int(round(fraction * len(tunes))))
  names = sorted(tunes)
  return {names[i] for i in order[:count]}


def settings() -> dict:
  return {'version': VERSION, 'sample_rate': SAMPLE_RATE, 'item_seconds': ITEM_SECONDS, 'windows': list(WINDOWS),
          'min_notes': MIN_NOTES, 'target_rms': TARGET_RMS, 'test_fraction': TEST_FRACTION,
          'families': {k: list(v) for k, v in FAMILIES.items()}, 'soundfont': SOUNDFONT.pattern,
          'tunes': [p.name for p in TUNES]}


Renderer = Callable[[Sequence[Event], int, float, float], np.ndarray]


def cached_build(root: str, config: dict, log: Callable[[str], None]) -> dict | None:
  """root/build.json's contents when the set under `root` was built with `config`; else None, with what an earlier
  build (of other settings, or interrupted) left cleared away. Shared by every set's `build`."""
  done = os.path.join(root, 'build.json')
  if os.path.exists(done):
    with open(done, encoding='utf-8') as f:
      built = json.load(f)
    if built.get('settings') == config:
      return built
    log(f'{root} holds a set built with other settings; rebuilding it.')
    os.remove(done)
  shutil.rmtree(os.path.join(root, 'audio'), ignore_errors=True)
  return None


def write_build(root: str, built: dict) -> None:
  """Writes root/build.json, last of a build: a set without it is built again."""
  with open(os.path.join(root, 'build.json'), 'w', encoding='utf-8') as f:
    json.dump(built, f, indent=1)


def build(root: str, *, tunes: dict[str, str] | None = None, read_events: Callable[[str], list[Event]] = midi_events,
          render: Renderer | None = None, config: dict | None = None, install: bool = True,
          log: Callable[[str], None] = print) -> dict:
  """Writes the set under `root` unless an identical one is there; returns the contents of root/build.json.

  `tunes`, `read_events` and `render` default to the packaged material (installed first if missing); passing them
  builds the same layout from other material. build.json is written last, so an interrupted build is redone.
  `install`: install missing packages (apt-get as root, pip) rather than fail with the command to run.
  """
  config = config or settings()
  cached = cached_build(root, config, log)
  if cached is not None:
    return cached
  if tunes is None:
    ensure_material(install)
    tunes = tune_paths()
  if not tunes:
    raise QualityDataError('no tunes to render.')
  render = render or SoundFontRenderer(glob.glob(SOUNDFONT.pattern)[0])
  test = test_tunes(list(tunes), config['test_fraction'])
  rows, skipped = [], []
  for n, (tune, path) in enumerate(tunes.items()):
    events = read_events(path)
    starts = excerpt_starts(events, config['item_seconds'], config['windows'], config['min_notes'])
    if not starts:
      skipped.append(tune)
    for window, start in enumerate(starts):
      for family in FAMILIES:
        program = program_for(tune, window, family)
        audio = at_loudness(render(events, program, start, config['item_seconds']), config['target_rms'])
        file = f'{family}/{tune}_{window}.wav'
        os.makedirs(os.path.join(root, 'audio', family), exist_ok=True)
        soundfile.write(os.path.join(root, 'audio', file), audio, config['sample_rate'], subtype='PCM_16')
        rows.append({'file': file, 'split': 'test' if tune in test else 'train', 'group': tune,
                     'program': program})
    log(f'[{n + 1}/{len(tunes)}] {tune}: {len(starts)} excerpts x {len(FAMILIES)} families')
  with open(os.path.join(root, 'split.csv'), 'w', newline='', encoding='utf-8') as f:
    writer = csv.DictWriter(f, fieldnames=['file', 'split', 'group', 'program'])
    writer.writeheader()
    writer.writerows(rows)
  built = {'settings': config, 'files': len(rows), 'tunes': len(tunes) - len(skipped), 'skipped_tunes': skipped,
           'test_tunes': sorted(test - set(skipped)), 'audio_seconds': len(rows) * config['item_seconds'],
           'labels': list(FAMILIES)}
  write_build(root, built)
  return built
