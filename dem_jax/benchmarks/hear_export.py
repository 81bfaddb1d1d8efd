"""A built folder set (`<root>/audio/<label>/<file>`, `<root>/split.csv`) in the HEAR 2021 task format.

The format is the one hear-preprocess writes and heareval's runners read (`heareval.embeddings.runner`,
`heareval.predictions.runner`): a task folder `<name>-<version>-full/` holding

- task_metadata.json: task_name, version, mode, embedding_type 'scene', prediction_type 'multiclass', split_mode
  'trainvaltest', splits ['train', 'valid', 'test'], sample_duration (seconds, or null when the clips differ in
  length: the kit then embeds one file at a time and nothing is cut or padded), evaluation ['top1_acc'];
- labelvocabulary.csv: columns idx, label (labels sorted);
- <split>.json: {file name: [label]} for each split;
- 16000/<split>/<file name>: the audio, mono 16-bit PCM wav at 16 kHz, file names unique within the task.

HEAR scores with train, valid and test splits; the set has train and test. The valid split is a seeded share of the
training groups (VALID_FRACTION, at least one), so a group (tune, passage, source file) stays on one side.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from typing import Callable

import numpy as np
import soundfile
import soxr

from dem_jax.benchmarks import quality_data

SAMPLE_RATE = 16000
SPLITS = ('train', 'valid', 'test')
VALID_FRACTION = 0.15
VALID_SEED = 1  # Not the test draw's seed 0: another draw of groups.


def hear_name(file: str) -> str:
  """A file's name in the flat split folder: its path below audio/ with '/' as '__'."""
  return file.replace('/', '__')


def read_split_file(data_root: str) -> list[dict]:
  with open(os.path.join(data_root, 'split.csv'), newline='', encoding='utf-8') as f:
    return list(csv.DictReader(f))


def hear_splits(rows: list[dict]) -> dict[str, str]:
  """{file: 'train' | 'valid' | 'test'}: test as in split.csv, valid a seeded share of the training groups."""
  train_groups = sorted({r.get('group') or r['file'] for r in rows if r['split'] == 'train'})
  valid = quality_data.test_tunes(train_groups, VALID_FRACTION, seed=VALID_SEED) if len(train_groups) > 1 else set()
  return {r['file']: 'test' if r['split'] == 'test' else 'valid' if (r.get('group') or r['file']) in valid else 'train'
          for r in rows}


def _write_wav(source: str, target: str) -> float:
  """Copies a 16-kHz mono 16-bit wav as it is, converts anything else; returns its duration in seconds."""
  info = soundfile.info(source)
  if (info.samplerate, info.channels, info.subtype, info.format) == (SAMPLE_RATE, 1, 'PCM_16', 'WAV'):
    shutil.copyfile(source, target)
    return info.frames / info.samplerate
  audio, rate = soundfile.read(source, dtype='float32', always_2d=True)
  audio = audio.mean(axis=1)
  if rate != SAMPLE_RATE:
    audio = soxr.resample(audio, rate, SAMPLE_RATE, quality='HQ').astype(np.float32)
  soundfile.write(target, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, subtype='PCM_16')
  return len(audio) / SAMPLE_RATE


def export_task(task: str, data_root: str, out_dir: str, *, version: str,
                log: Callable[[str], None] = print) -> str:
  """Writes the set under data_root as the HEAR task `dem_jax_<task>` in out_dir; returns the task folder.

  A folder of the same name is replaced, so an interrupted export is redone whole.
  """
  rows = read_split_file(data_root)
  if not rows:
    raise quality_data.QualityDataError(f'{data_root}/split.csv lists no files; nothing to export.')
  task_name = f'dem_jax_{task}'
  folder = os.path.join(out_dir, f'{task_name}-{version}-full')
  tmp = folder + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  split_of = hear_splits(rows)
  labels = sorted({r['file'].split('/', 1)[0] for r in rows})
  per_split: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
  durations = set()
  for split in SPLITS:
    os.makedirs(os.path.join(tmp, str(SAMPLE_RATE), split))
  for r in rows:
    split, name = split_of[r['file']], hear_name(r['file'])
    durations.add(round(_write_wav(os.path.join(data_root, 'audio', r['file']),
                                   os.path.join(tmp, str(SAMPLE_RATE), split, name)), 3))
    per_split[split][name] = [r['file'].split('/', 1)[0]]
  for split, labelled in per_split.items():
    with open(os.path.join(tmp, f'{split}.json'), 'w', encoding='utf-8') as f:
      json.dump(dict(sorted(labelled.items())), f, indent=1)
  with open(os.path.join(tmp, 'labelvocabulary.csv'), 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(['idx', 'label'])
    writer.writerows(enumerate(labels))
  metadata = {
      'task_name': task_name, 'version': version, 'mode': 'full', 'embedding_type': 'scene',
      'prediction_type': 'multiclass', 'split_mode': 'trainvaltest', 'splits': list(SPLITS),
      'sample_duration': durations.pop() if len(durations) == 1 else None, 'evaluation': ['top1_acc'],
      'sample_rates': [SAMPLE_RATE], 'source': 'dem-jax bench quality --suite',
  }
  with open(os.path.join(tmp, 'task_metadata.json'), 'w', encoding='utf-8') as f:
    json.dump(metadata, f, indent=1)
  shutil.rmtree(folder, ignore_errors=True)
  os.replace(tmp, folder)
  log(f'HEAR task {os.path.basename(folder)}: ' + ', '.join(f'{len(per_split[s])} {s}' for s in SPLITS)
      + f' files, {len(labels)} labels')
  return folder
