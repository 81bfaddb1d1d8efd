"""The quality suite's speech task: who is speaking, told from voices built from recordings of real speakers.

Material, all from Debian packages (the builder installs them when run as root):
- voices: festival's diphone and HTS voices, each built from the recordings of one real speaker: American English
  `festvox-kallpc16k` (kal), `festvox-kdlpc16k` (ked) and `festvox-us-slt-hts` (slt); Czech `festvox-czech-dita`,
  `-krb`, `-machac` and `-ph` (with `festival-czech`); Italian `festvox-italp16k` (lp) and `festvox-itapc16k` (pc);
  spoken by `festival`'s text2wave;
- text: the fortune cookies of `fortunes` (English), `fortunes-cs` (Czech) and `fortunes-it` (Italian).

A passage is one fortune of PASSAGE_CHARS characters, chosen in a fixed order (by a hash of its text) so that no
sentence is in two passages; every voice of the passage's language speaks it (cut to ITEM_SECONDS, at a fixed
loudness). The label is the voice; the group is the passage, and the split is by passage, the same passages on the
test side for every voice of a language: no sentence of the test split is ever spoken in training, and within a
language only the voice tells the classes apart. Each file is then heard as if recorded apart from the others
(`recorded`): its own microphone colouring, band limits, room and background noise, drawn from the file's name, so
that the channel is no cue to the voice and a voice's spectrum is not the same from file to file. On disk:
`<root>/audio/<voice>/<passage>.wav` and `<root>/split.csv` (file, split, group, language).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import subprocess
import tempfile
import zlib
from typing import Callable, Sequence

import numpy as np
import soundfile

from dem_jax.benchmarks import quality_data
from dem_jax.benchmarks.quality_data import Package, QualityDataError

SAMPLE_RATE = 16000
ITEM_SECONDS = 10.0
PASSAGE_CHARS = (150, 320)  # A passage this long takes about 10-20 s to speak.
TEST_FRACTION = 0.3
VERSION = 3  # Bump when the rendering changes, so that cached sets are rebuilt.
DEFAULT_MINUTES = 60.0
# The recording conditions, one draw per file (`recorded`): a smooth gain curve of up to +-CONDITION['eq_db'] over
# the Mel scale, a high-pass and a low-pass edge drawn within their ranges (Hz), a room of reverberation time
# drawn within `rt60` (s), and coloured noise at a signal-to-noise ratio drawn within `snr_db`.
CONDITION = {'eq_db': 10.0, 'eq_points': 7, 'high_pass': (50.0, 400.0), 'low_pass': (3500.0, 8000.0),
             'rt60': (0.2, 0.8), 'snr_db': (5.0, 25.0)}


@dataclasses.dataclass(frozen=True)
class Voice:
  label: str  # <language>_<speaker>
  language: str
  package: Package
  command: str  # festival's command that selects the voice


VOICE_DIR = '/usr/share/festival/voices'
VOICES = (
    Voice('en_kal', 'en', Package('festvox-kallpc16k', f'{VOICE_DIR}/english/kal_diphone'), 'voice_kal_diphone'),
    Voice('en_ked', 'en', Package('festvox-kdlpc16k', f'{VOICE_DIR}/english/ked_diphone'), 'voice_ked_diphone'),
    Voice('en_slt', 'en', Package('festvox-us-slt-hts', f'{VOICE_DIR}/us/cmu_us_slt_arctic_hts'),
          'voice_cmu_us_slt_arctic_hts'),
    Voice('cs_dita', 'cs', Package('festvox-czech-dita', f'{VOICE_DIR}/czech/czech_dita'), 'voice_czech_dita'),
    Voice('cs_krb', 'cs', Package('festvox-czech-krb', f'{VOICE_DIR}/czech/czech_krb'), 'voice_czech_krb'),
    Voice('cs_machac', 'cs', Package('festvox-czech-machac', f'{VOICE_DIR}/czech/czech_machac'),
          'voice_czech_machac'),
    Voice('cs_ph', 'cs', Package('festvox-czech-ph', f'{VOICE_DIR}/czech/czech_ph'), 'voice_czech_ph'),
    Voice('it_lp', 'it', Package('festvox-italp16k', f'{VOICE_DIR}/italian/lp_diphone'), 'voice_lp_diphone'),
    Voice('it_pc', 'it', Package('festvox-itapc16k', f'{VOICE_DIR}/italian/pc_diphone'), 'voice_pc_diphone'),
)
SYNTHESIZER = (Package('festival', '/usr/bin/text2wave'),
               Package('festival-czech', '/usr/share/festival/czech.scm'))

FORTUNES = '/usr/share/games/fortunes'
# Prose collections only (no verse, ASCII art or dialogue scripts), and festival's 8-bit encoding per language.
TEXTS = {
    'en': (Package('fortunes', f'{FORTUNES}/wisdom'),
           ('wisdom', 'people', 'science', 'humorists', 'education', 'politics', 'platitudes', 'men-women', 'work',
            'law', 'medicine', 'food', 'pets', 'love', 'computers', 'miscellaneous')),
    'cs': (Package('fortunes-cs', f'{FORTUNES}/cs/citace'),
           ('cs/citace', 'cs/citat', 'cs/klasik-cz', 'cs/jerome', 'cs/ignac', 'cs/guth', 'cs/josef', 'cs/cimrman',
            'cs/filmy')),
    'it': (Package('fortunes-it', f'{FORTUNES}/it/italia'),
           ('it/italia', 'it/leggi', 'it/definizioni', 'it/formiche', 'it/luttazzi', 'it/paolotedeschi',
            'it/norm', 'it/adams', 'it/zuse')),
}
ENCODINGS = {'en': 'ascii', 'cs': 'iso-8859-2', 'it': 'iso-8859-1'}


def packages() -> tuple[Package, ...]:
  return SYNTHESIZER + tuple(v.package for v in VOICES) + tuple(p for p, _ in TEXTS.values())


def read_fortunes(paths: Sequence[str]) -> list[str]:
  """The fortunes of fortune(6) files (entries between lines holding a single %), whitespace collapsed."""
  entries = []
  for path in paths:
    if not os.path.exists(path):
      continue
    with open(path, encoding='utf-8', errors='replace') as f:
      for entry in re.split(r'^%\s*$', f.read(), flags=re.M):
        text = ' '.join(entry.split())
        if text:
          entries.append(text)
  return entries


def speakable(text: str) -> str:
  """The text as the voices read it: quotes, brackets and other marks that festival's tokenizer can crash on (with
  a segmentation fault) are dropped, dashes become commas and runs of dots one dot."""
  text = text.replace('--', ',')
  text = re.sub(r'[\"`()\[\]{}*_<>|/\\#~^=+@&%$]', ' ', text)
  text = re.sub(r'\.{2,}', '.', text)
  text = re.sub(r'\s+([,.;:!?])', r'\1', text)
  text = re.sub(r'([,.;:!?])[,.;:!?\s]*[,.;:!?]', r'\1', text)  # one mark where several meet
  return ' '.join(text.split()).lstrip(',.;:!? ')


def sentences(text: str) -> list[str]:
  return [s for s in re.split(r'(?<=[.!?])\s+', text) if s.strip()]


def sentence_key(sentence: str) -> str:
  """What makes two sentences the same: their letters, lower case (case, punctuation and spacing aside)."""
  return ''.join(ch for ch in sentence.lower() if ch.isalpha())


def is_prose(text: str, encoding: str) -> bool:
  """A passage the voice can read: mostly letters and spaces, written in its language's 8-bit encoding."""
  if not PASSAGE_CHARS[0] <= len(text) <= PASSAGE_CHARS[1]:
    return False
  if sum(ch.isalpha() or ch == ' ' for ch in text) < 0.85 * len(text):
    return False
  return len(text.encode(encoding, errors='ignore')) >= 0.97 * len(text)


def choose_passages(fortunes: Sequence[str], count: int, encoding: str) -> list[str]:
  """`count` passages (made `speakable`) in a fixed order (a hash of the text), none sharing a sentence with
  another."""
  chosen, used = [], set()
  for text in sorted({speakable(t) for t in fortunes}, key=lambda t: (zlib.crc32(t.encode()), t)):
    if len(chosen) == count:
      break
    keys = {sentence_key(s) for s in sentences(text)} - {''}
    if not is_prose(text, encoding) or not keys or keys & used:
      continue
    chosen.append(text)
    used |= keys
  return chosen


def passages_per_language(minutes: float) -> int:
  """Passages per language so that the set holds about `minutes` of speech (every voice speaks each once)."""
  return max(4, int(round(minutes * 60 / ITEM_SECONDS / len(VOICES))))


class FestivalRenderer:
  """Speaks a text with a festival voice (text2wave), mono float32 at SAMPLE_RATE."""

  def __call__(self, text: str, voice: Voice) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
      text_path, wav_path = os.path.join(tmp, 'text.txt'), os.path.join(tmp, 'speech.wav')
      with open(text_path, 'wb') as f:
        f.write(text.encode(ENCODINGS[voice.language], errors='ignore'))
      result = subprocess.run(['text2wave', '-eval', f'({voice.command})', '-F', str(SAMPLE_RATE), '-o', wav_path,
                               text_path], capture_output=True, check=False)
      if result.returncode or not os.path.exists(wav_path):
        raise QualityDataError(f'text2wave with {voice.command} failed (exit {result.returncode}): '
                               f'{result.stderr.decode(errors="replace")[-300:]}')
      audio, rate = soundfile.read(wav_path, dtype='float32', always_2d=True)
    if rate != SAMPLE_RATE:
      raise QualityDataError(f'text2wave wrote {rate} Hz, not {SAMPLE_RATE}.')
    return audio.mean(axis=1)


def recorded(audio: np.ndarray, key: str, rate: int = SAMPLE_RATE, condition: dict = CONDITION) -> np.ndarray:
  """`audio` as heard through a recording chain of its own, drawn from `key` (the file's name): the same key gives
  the same chain. Same length, float32; the loudness is set afterwards."""
  rng = np.random.default_rng(zlib.crc32(key.encode()))
  n = len(audio)
  freqs = np.fft.rfftfreq(n, 1 / rate)
  mels = 2595 * np.log10(1 + freqs / 700)
  points = np.linspace(0, mels[-1], condition['eq_points'])
  gain_db = np.interp(mels, points, rng.uniform(-1, 1, len(points)) * condition['eq_db'])
  high, low = rng.uniform(*condition['high_pass']), rng.uniform(*condition['low_pass'])
  gain_db -= 30 * np.clip((high - freqs) / 100, 0, 1) + 40 * np.clip((freqs - low) / 500, 0, 1)
  out = np.fft.irfft(np.fft.rfft(audio.astype(np.float64)) * 10 ** (gain_db / 20), n)
  # A room: exponentially decaying noise (-60 dB at rt60) after a direct path of its own strength.
  rt60 = rng.uniform(*condition['rt60'])
  t = np.arange(int(rt60 * rate)) / rate
  response = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60)
  response[0] = rng.uniform(1, 4) * np.abs(response).max()
  out = np.convolve(out, response)[:n]
  # Noise whose power falls as 1/f^c above 50 Hz, c in [0, 2] (white to brown).
  noise = np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) / (np.maximum(freqs, 50) / 50) ** rng.uniform(0, 1), n)
  snr_db = rng.uniform(*condition['snr_db'])
  out += noise * np.sqrt(np.mean(out ** 2) / max(np.mean(noise ** 2), 1e-20)) * 10 ** (-snr_db / 20)
  return out.astype(np.float32)


def settings(minutes: float = DEFAULT_MINUTES) -> dict:
  return {'version': VERSION, 'sample_rate': SAMPLE_RATE, 'item_seconds': ITEM_SECONDS,
          'passage_chars': list(PASSAGE_CHARS), 'test_fraction': TEST_FRACTION,
          'passages_per_language': passages_per_language(minutes), 'target_rms': quality_data.TARGET_RMS,
          'voices': [v.label for v in VOICES], 'texts': {k: list(v[1]) for k, v in TEXTS.items()},
          'condition': {k: list(v) if isinstance(v, tuple) else v for k, v in CONDITION.items()}}


Renderer = Callable[[str, Voice], np.ndarray]


def build(root: str, *, minutes: float = DEFAULT_MINUTES, texts: dict[str, list[str]] | None = None,
          voices: Sequence[Voice] = VOICES, render: Renderer | None = None, config: dict | None = None,
          install: bool = True, log: Callable[[str], None] = print) -> dict:
  """Writes the set under `root` unless an identical one is there; returns the contents of root/build.json.

  `texts` ({language: fortunes}) and `render` default to the packaged material (installed first if missing);
  passing them builds the same layout from other material. Raises quality_data.MissingMaterialError naming the
  packages that are missing.
  """
  config = config or settings(minutes)
  cached = quality_data.cached_build(root, config, log)
  if cached is not None:
    return cached
  if texts is None:
    quality_data.ensure_material(install, packages(), python_requirements={}, name='speech set')
    texts = {lang: read_fortunes([os.path.join(FORTUNES, f) for f in files]) for lang, (_, files) in TEXTS.items()}
  render = render or FestivalRenderer()
  rows, test_passages, seconds = [], [], 0.0
  for language in sorted({v.language for v in voices}):
    passages = choose_passages(texts.get(language, []), config['passages_per_language'], ENCODINGS[language])
    if len(passages) < 2:
      raise QualityDataError(f'only {len(passages)} passages of {language} text; the set needs two or more.')
    names = [f'{language}-{i:03d}' for i in range(len(passages))]
    test = quality_data.test_tunes(names, config['test_fraction'])
    test_passages += sorted(test)
    for voice in [v for v in voices if v.language == language]:
      os.makedirs(os.path.join(root, 'audio', voice.label), exist_ok=True)
      for name, text in zip(names, passages):
        file = f'{voice.label}/{name}.wav'
        audio = render(text, voice)[:int(config['item_seconds'] * config['sample_rate'])]
        audio = recorded(audio, file, config['sample_rate'], config['condition'])
        audio = quality_data.at_loudness(audio, config['target_rms'])
        soundfile.write(os.path.join(root, 'audio', file), audio, config['sample_rate'], subtype='PCM_16')
        seconds += len(audio) / config['sample_rate']
        rows.append({'file': file, 'split': 'test' if name in test else 'train', 'group': name,
                     'language': language, 'text': text})
      log(f'{voice.label}: {len(passages)} passages')
  with open(os.path.join(root, 'split.csv'), 'w', newline='', encoding='utf-8') as f:
    writer = csv.DictWriter(f, fieldnames=['file', 'split', 'group', 'language'], extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
  # The passages' text, for checking that no sentence is on both sides.
  with open(os.path.join(root, 'passages.json'), 'w', encoding='utf-8') as f:
    json.dump({r['group']: r['text'] for r in rows}, f, indent=1, ensure_ascii=False)
  built = {'settings': config, 'files': len(rows), 'passages': len({r['group'] for r in rows}),
           'test_passages': test_passages, 'audio_seconds': round(seconds, 1),
           'labels': sorted(v.label for v in voices)}
  quality_data.write_build(root, built)
  return built
