"""Dataset readers: real on-disk layouts -> a sorted list of clips with label, group, recording and split.

Two layouts:
- `dcase2018_task5`: the DCASE 2018 task 5 (SINS) development set (meta.txt, evaluation_setup/fold{1..4}_*.txt) or
  evaluation set (evaluation_setup/test.txt and, when present, evaluate.txt), audio in audio/.
- `folder`: `<root>/<label>/<file>` (labels are the folder names) or a flat folder of unlabelled audio; a seeded,
  stratified split by file, or a published split from a CSV (`file,split[,extra columns]`).

Vocabulary used everywhere downstream:
- group: what must not be split between train and test and what "another recording" means for distant tiles
  (the DCASE session, the song).
- recording/position: clips of one recording with consecutive positions are contiguous in time (DCASE's
  consecutive 10-s segments of one node and session), so temporal neighbours may cross from one into the next.
- split: 'train'/'test' for folder data; for the DCASE development set 'fold<k>', the fold whose evaluate list
  holds the clip (the train part of fold k is every other clip); 'eval' for the DCASE evaluation set.

What the readers refuse or report rather than read:
- A path in a list (meta.txt, an evaluation list, a split file) that is absolute or climbs out of the data root
  with '..' is a problem (reported, not read): a list names files of its own data set only.
- A list file or folder name that is not UTF-8 is a DatasetError naming the file and line (or the folder).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import re

import numpy as np

from dem_jax import audio

DCASE_LABELS = ('absence', 'cooking', 'dishwashing', 'eating', 'other', 'social_activity', 'vacuum_cleaner',
                'watching_tv', 'working')
DATASETS = ('dcase2018_task5', 'folder')
_DCASE_NAME = re.compile(r'^(?P<recording>.+_ex\d+)_(?P<position>\d+)$')


# The splits of folder data: what training trains on and what evaluation scores.
FOLDER_SPLITS = ('train', 'test')


class DatasetError(Exception):
  """The dataset's lists or layout are wrong as a whole (not one bad audio file)."""


@dataclasses.dataclass(frozen=True)
class ClipSource:
  clip_id: str
  path: str  # Relative to the dataset root.
  label: str  # '' when unlabelled.
  group: str
  recording: str
  position: int
  split: str
  extra: tuple[tuple[str, str], ...] = ()  # Extra columns of a split file, kept in the manifest.


@dataclasses.dataclass
class Dataset:
  name: str
  root: str
  clips: list[ClipSource]
  labels: list[str]
  problems: list[dict]  # {'path', 'reason'} for list/folder mismatches found while reading; the job reports them.
  warnings: list[str] = dataclasses.field(default_factory=list)  # Facts about the whole set worth a look.
  list_files: list[str] = dataclasses.field(default_factory=list)  # The list files read (absolute paths).


def sort_key(clip: ClipSource):
  # Recordings stay together and in time order, so a recording's clips are neighbours in the feature store.
  return (clip.recording, clip.position, clip.clip_id)


def read_dataset(name: str, data_dir: str, **options) -> Dataset:
  if not os.path.isdir(data_dir):
    raise DatasetError(f'--data_dir={data_dir} is not a directory.')
  if name == 'dcase2018_task5':
    dataset = read_dcase2018_task5(data_dir)
  elif name == 'folder':
    dataset = read_folder(data_dir, **options)
  else:
    raise DatasetError(f'Unknown --dataset={name!r}; choose one of {", ".join(DATASETS)}.')
  if not dataset.clips:
    raise DatasetError(f'No audio clips found under {data_dir} for --dataset={name}.')
  dataset.clips.sort(key=sort_key)
  ids = [c.clip_id for c in dataset.clips]
  if len(set(ids)) != len(ids):
    dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
    raise DatasetError(f'Clip ids are not unique in {data_dir}: {dupes}; rename the files.')
  return dataset


def read_text(path: str) -> list[str]:
  """The lines of a UTF-8 text file (a leading byte-order mark dropped); DatasetError naming the line otherwise."""
  with open(path, 'rb') as f:
    data = f.read().removeprefix(b'\xef\xbb\xbf')
  lines = []
  for n, line in enumerate(data.split(b'\n'), 1):  # Only \n (and \r\n) end a line, as in the files' writers.
    try:
      lines.append(line.decode('utf-8').removesuffix('\r'))
    except UnicodeDecodeError as e:
      raise DatasetError(f'{path}:{n}: not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1}); save '
                         'the file as UTF-8.') from None
  return lines[:-1] if lines and not lines[-1] else lines


def _read_list(path: str) -> list[list[str]]:
  """Rows of a tab-separated DCASE list; tolerates a missing final newline, blank lines and CRLF."""
  return [line.split('\t') for line in read_text(path) if line.strip()]


def outside_root(name: str) -> str | None:
  """Why a path taken from a list may not be read (absolute, or climbing out of the data root), else None.

  Checked on the path as written: a list names files of its own data set. Symlinks inside the root are the data
  owner's choice and are followed.
  """
  if '\0' in name:
    return 'holds a NUL byte, which no file name can; not read'
  if os.path.isabs(name) or re.match(r'^[A-Za-z]:[\\/]', name):
    return 'an absolute path; lists name files relative to the data folder, so it was not read'
  normal = os.path.normpath(name)
  if normal == os.pardir or normal.startswith(os.pardir + os.sep):
    return "climbs out of the data folder with '..'; not read"
  return None


def _check_utf8_name(root: str, relpath: str, what: str) -> None:
  try:
    relpath.encode('utf-8')
  except UnicodeEncodeError:
    shown = os.fsencode(os.path.join(root, relpath))
    raise DatasetError(f'The {what} {shown!r} has a name that is not UTF-8; rename it with UTF-8 characters.'
                       ) from None


def _dcase_clip(name: str, label: str, session: str | None, split: str) -> ClipSource:
  clip_id = os.path.splitext(os.path.basename(name))[0]
  match = _DCASE_NAME.match(clip_id)
  recording, position = (match['recording'], int(match['position'])) if match else (clip_id, 0)
  if session is None:
    session = recording.split('_', 1)[1] if match else clip_id
  return ClipSource(clip_id=clip_id, path=name, label=label, group=session, recording=recording, position=position,
                    split=split)


def dcase_labels(found: set[str], source: str) -> tuple[list[str], list[str]]:
  """The label set of a DCASE-layout data set and any warnings: the nine DCASE 2018 task 5 labels, in their order,
  when every label found is one of them (so label indices agree across folds and sets); otherwise the sorted labels
  found, with a warning naming the differences, so that any data set in this layout can be read."""
  if found <= set(DCASE_LABELS):
    return list(DCASE_LABELS), []
  unknown = sorted(found - set(DCASE_LABELS))
  absent = sorted(set(DCASE_LABELS) - found)
  warning = (f'{source} holds labels outside the DCASE 2018 task 5 set ({", ".join(unknown)}); '
             + (f'absent DCASE labels: {", ".join(absent)}; ' if absent else '')
             + f'using the {len(found)} labels found, sorted.')
  logging.warning('%s', warning)
  return sorted(found), [warning]


def read_dcase2018_task5(root: str) -> Dataset:
  """The DCASE 2018 task 5 layout; the label set comes from meta.txt (or evaluate.txt), see `dcase_labels`."""
  setup = os.path.join(root, 'evaluation_setup')
  meta = os.path.join(root, 'meta.txt')
  problems = []
  if os.path.exists(meta):
    fold_of = {}
    lists = [meta]
    for k in range(1, 5):
      path = os.path.join(setup, f'fold{k}_evaluate.txt')
      if not os.path.exists(path):
        raise DatasetError(f'{path} is missing; the development set needs evaluation_setup/fold1..4_evaluate.txt.')
      lists.append(path)
      for n, row in enumerate(_read_list(path), 1):
        if reason := outside_root(row[0]):
          problems.append({'path': row[0], 'reason': f'{path}:{n}: {reason}'})
          continue
        if row[0] in fold_of:
          raise DatasetError(f'{row[0]} is in the evaluate lists of fold {fold_of[row[0]]} and fold {k} ({path}); '
                             'each clip must be evaluated in exactly one fold.')
        fold_of[row[0]] = k
    clips, unevaluated = [], []
    for n, row in enumerate(_read_list(meta), 1):
      if len(row) < 2:
        raise DatasetError(f'{meta}:{n}: expected "audio/<name>.wav<TAB><label><TAB><session>", got {row!r}.')
      name, label = row[0], row[1]
      if reason := outside_root(name):
        problems.append({'path': name, 'reason': f'{meta}:{n}: {reason}'})
        continue
      if not label:
        raise DatasetError(f'{meta}:{n}: the label column is empty; every clip of meta.txt needs a label.')
      fold = fold_of.get(name)
      if fold is None:
        unevaluated.append(name)
      clips.append(_dcase_clip(name, label, row[2] if len(row) > 2 else None, f'fold{fold}' if fold else 'none'))
    known = {c.path for c in clips}
    for name in sorted(set(fold_of) - known):
      problems.append({'path': name, 'reason': 'in an evaluate list but not in meta.txt; skipped'})
    labels, warnings = dcase_labels({c.label for c in clips}, meta)
    if unevaluated:  # Written and used for training, only never scored: a warning, not a failed file.
      warnings.append(f'{len(unevaluated)} clip(s) of meta.txt are in no fold*_evaluate.txt (first: {unevaluated[0]}); '
                      'they are kept with split "none": trained on, never scored.')
    return Dataset('dcase2018_task5', root, clips, labels, problems, warnings, [os.path.abspath(p) for p in lists])

  test_list = os.path.join(setup, 'test.txt')
  if not os.path.exists(test_list):
    raise DatasetError(f'{root} has neither meta.txt (development set) nor evaluation_setup/test.txt (evaluation set); '
                       'point --data_dir at the folder that holds audio/ and evaluation_setup/.')
  labels = {}
  lists = [test_list]
  evaluate = os.path.join(setup, 'evaluate.txt')
  if os.path.exists(evaluate):
    lists.append(evaluate)
    labels = {row[0]: row[1] for row in _read_list(evaluate) if len(row) > 1}
  clips = []
  for n, row in enumerate(_read_list(test_list), 1):
    if reason := outside_root(row[0]):
      problems.append({'path': row[0], 'reason': f'{test_list}:{n}: {reason}'})
      continue
    clips.append(_dcase_clip(row[0], labels.get(row[0], ''), row[2] if len(row) > 2 else None, 'eval'))
  label_set, warnings = dcase_labels({c.label for c in clips if c.label}, evaluate)
  return Dataset('dcase2018_task5', root, clips, label_set, problems, warnings, [os.path.abspath(p) for p in lists])


def read_folder(root: str, *, split_file: str | None = None, test_fraction: float = 0.2, split_seed: int = 0
                ) -> Dataset:
  """Class folders `<root>/<label>/...` (or a flat folder of unlabelled audio).

  Folders that are symlinks are followed, as a data set assembled from links expects. A folder reached twice (a
  link loop, or two links to one folder) is read once, at its first path in sorted order; every later path to it is
  reported as a problem, never skipped in silence.
  """
  files, problems = [], []
  seen = {}  # Real path of each folder read -> its path under the root.
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    relative = os.path.relpath(dirpath, root)
    if relative != '.':
      _check_utf8_name(root, relative, 'folder')
    real = os.path.realpath(dirpath)
    if real in seen:
      problems.append({'path': relative, 'reason': f'the same folder as {seen[real]} (a symlink loop or a second '
                                                   'link); read once, under its first path'})
      dirnames[:] = []
      continue
    seen[real] = relative
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
    for f in filenames:
      if not audio.is_audio_file(f) or f.startswith('.'):
        continue
      path = os.path.normpath(os.path.join(relative, f))
      try:
        path.encode('utf-8')
      except UnicodeEncodeError:
        problems.append({'path': repr(os.fsencode(path)), 'reason': 'file name is not UTF-8; rename it; not read'})
        continue
      files.append(path)
  files.sort()
  nested = [f for f in files if os.sep in f]
  if nested and len(nested) != len(files):
    flat = sorted(set(files) - set(nested))[:3]
    raise DatasetError(f'{root} mixes class folders with loose files ({flat} ...); move the loose files into a '
                       'class folder, or point --data_dir at a folder of only unlabelled audio.')
  label_of = {f: f.split(os.sep, 1)[0] if nested else '' for f in files}
  labels = sorted({l for l in label_of.values() if l})
  split_of, extras, warnings = {}, {}, []
  if split_file:
    split_of, extras, split_problems, warnings = _read_split_file(split_file, files)
    problems += split_problems
    files = [f for f in files if f in split_of]
  elif labels:
    split_of = stratified_split(files, [label_of[f] for f in files], test_fraction, split_seed)
  else:
    split_of = {f: 'train' for f in files}
  clips = []
  for f in files:
    clip_id = os.path.splitext(f)[0].replace(os.sep, '/')
    extra = extras.get(f, {})
    group = extra.get('group') or clip_id
    clips.append(ClipSource(clip_id=clip_id, path=f, label=label_of[f], group=group, recording=clip_id, position=0,
                            split=split_of[f], extra=tuple(sorted(extra.items()))))
  return Dataset('folder', root, clips, labels, problems, warnings,
                 list_files=[os.path.abspath(split_file)] if split_file else [])


def stratified_split(files: list[str], labels: list[str], test_fraction: float, seed: int) -> dict[str, str]:
  """A fixed, seeded split by file: within each label, round(test_fraction * n) files go to 'test'.

  Hand-written rather than sklearn's train_test_split because that one refuses classes with a single file and
  reorders with the whole list, while a per-label draw keeps each label's split unchanged when others are added.
  """
  if not 0.0 <= test_fraction < 1.0:
    raise DatasetError(f'test_fraction={test_fraction} must lie in [0, 1).')
  split = {}
  for label in sorted(set(labels)):
    members = sorted(f for f, l in zip(files, labels) if l == label)
    rng = np.random.default_rng([seed, int.from_bytes(label.encode()[:8].ljust(8, b'\0'), 'little')])
    order = rng.permutation(len(members))
    num_test = int(round(test_fraction * len(members)))
    for rank, i in enumerate(order):
      split[members[i]] = 'test' if rank < num_test else 'train'
  return split


def _read_split_file(path: str, files: list[str]):
  if not os.path.exists(path):
    raise DatasetError(f'--split_file={path} does not exist.')
  reader = csv.DictReader(read_text(path))
  if not reader.fieldnames or not {'file', 'split'} <= set(reader.fieldnames):
    raise DatasetError(f'{path} needs a header with the columns "file" and "split" (got {reader.fieldnames}).')
  rows = list(reader)
  on_disk = set(files)
  split_of, extras, problems, case_folded = {}, {}, [], []
  for n, row in enumerate(rows, 2):
    name = (row['file'] or '').strip()
    if reason := outside_root(name):
      problems.append({'path': name, 'reason': f'{path}:{n}: {reason}'})
      continue
    name = os.path.normpath(name)
    if name not in on_disk:
      problems.append({'path': name, 'reason': f'listed in {path} (line {n}) but not found under the data folder'})
      continue
    split = (row['split'] or '').strip()
    if split.lower() not in FOLDER_SPLITS:
      raise DatasetError(f'{path}:{n}: split {split!r} for {name}; the split column takes '
                         f'{" or ".join(FOLDER_SPLITS)} (in any case). Fix the line and run the same command again.')
    if split != split.lower():
      case_folded.append(f'{path}:{n}')
    split_of[name] = split.lower()
    extras[name] = {k: (v or '').strip() for k, v in row.items() if k not in ('file', 'split') and k is not None}
  for name in sorted(on_disk - set(split_of)):
    problems.append({'path': name, 'reason': f'in the data folder but not listed in {path}; skipped'})
  warnings = []
  if case_folded:
    warnings.append(f'{len(case_folded)} split value(s) were not lower case (first: {case_folded[0]}); read as '
                    f'{" and ".join(FOLDER_SPLITS)}.')
  return split_of, extras, problems, warnings
