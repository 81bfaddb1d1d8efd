import os
import shutil

import pytest

from dem_jax import datasets
from dem_jax.preprocess import sample_data


def test_dcase_development_layout(dcase_dir):
  ds = datasets.read_dataset('dcase2018_task5', dcase_dir)
  assert ds.labels == list(datasets.DCASE_LABELS)
  assert len(ds.clips) == 32 and not ds.problems
  clip = next(c for c in ds.clips if c.clip_id == 'DevNode1_ex1_2')
  assert (clip.path, clip.label, clip.recording, clip.position) == ('audio/DevNode1_ex1_2.wav', 'absence',
                                                                  'DevNode1_ex1', 2)
  assert clip.group == 'absence_0'
  # Each clip is evaluated in exactly one fold, and a session's clips share it.
  assert {c.split for c in ds.clips} == {'fold1', 'fold2', 'fold3', 'fold4'}
  by_group = {}
  for c in ds.clips:
    by_group.setdefault(c.group, set()).add(c.split)
  assert all(len(s) == 1 for s in by_group.values())
  # Sorted by recording then time.
  keys = [datasets.sort_key(c) for c in ds.clips]
  assert keys == sorted(keys)


def test_dcase_accepts_two_column_evaluate_lists_and_missing_final_newline(dcase_dir, tmp_path):
  root = tmp_path / 'dcase'
  shutil.copytree(dcase_dir, root)
  for k in range(1, 5):
    path = root / 'evaluation_setup' / f'fold{k}_evaluate.txt'
    rows = [line.split('\t')[:2] for line in path.read_text().splitlines()]
    path.write_text('\n'.join('\t'.join(r) for r in rows))  # name, label; no final newline
  assert not (root / 'meta.txt').read_text().endswith('\n')
  ds = datasets.read_dataset('dcase2018_task5', str(root))
  assert len(ds.clips) == 32 and {c.split for c in ds.clips} == {'fold1', 'fold2', 'fold3', 'fold4'}


def test_dcase_clip_in_two_folds_is_an_error(dcase_dir, tmp_path):
  root = tmp_path / 'dcase'
  shutil.copytree(dcase_dir, root)
  first = (root / 'evaluation_setup' / 'fold1_evaluate.txt').read_text().splitlines()[0]
  with open(root / 'evaluation_setup' / 'fold2_evaluate.txt', 'a') as f:
    f.write(first + '\n')
  with pytest.raises(datasets.DatasetError, match='exactly one fold'):
    datasets.read_dataset('dcase2018_task5', str(root))


def test_dcase_evaluation_set_layout(tmp_path):
  sample_data.write_dcase2018_task5(str(tmp_path), labels=('absence', 'working'), sessions_per_label=1,
                                    clips_per_session=2, nodes=1)
  (tmp_path / 'meta.txt').unlink()
  setup = tmp_path / 'evaluation_setup'
  rows = (setup / 'fold1_evaluate.txt').read_text().splitlines()
  (setup / 'test.txt').write_text('\n'.join(r.split('\t')[0] for r in rows) + '\n')
  (setup / 'evaluate.txt').write_text('\n'.join('\t'.join(r.split('\t')[:2]) for r in rows) + '\n')
  ds = datasets.read_dataset('dcase2018_task5', str(tmp_path))
  assert len(ds.clips) == len(rows) and {c.split for c in ds.clips} == {'eval'}
  assert {c.label for c in ds.clips} == {'absence', 'working'}


def test_folder_labels_and_seeded_stratified_split(music_dir):
  ds = datasets.read_dataset('folder', music_dir, test_fraction=0.34, split_seed=3)
  assert ds.labels == list(sample_data.GENRES)
  assert len(ds.clips) == 12
  for genre in ds.labels:
    splits = [c.split for c in ds.clips if c.label == genre]
    assert splits.count('test') == 1 and splits.count('train') == 2
  again = datasets.read_dataset('folder', music_dir, test_fraction=0.34, split_seed=3)
  assert [c.split for c in again.clips] == [c.split for c in ds.clips]
  assert all(c.group == c.clip_id for c in ds.clips)  # Each file is its own group.


def test_folder_split_file_is_used_as_given_and_mismatches_reported(music_dir, tmp_path):
  ds = datasets.read_dataset('folder', music_dir)
  listed = [c.path for c in ds.clips][:-1]  # One file on disk is not listed...
  csv = tmp_path / 'split.csv'
  csv.write_text('file,split,group\n' + ''.join(f'{p},{"test" if i % 2 else "train"},g{i // 4}\n'
                                                for i, p in enumerate(listed)) + 'techno/missing.wav,train,g9\n')
  ds2 = datasets.read_dataset('folder', music_dir, split_file=str(csv))
  assert [c.path for c in ds2.clips] == sorted(listed)
  assert {c.path: c.split for c in ds2.clips} == {p: 'test' if i % 2 else 'train' for i, p in enumerate(listed)}
  assert {c.path: c.group for c in ds2.clips}[listed[5]] == 'g1'  # Extra columns: a group column is used.
  reasons = {p['path']: p['reason'] for p in ds2.problems}
  assert 'not found' in reasons[os.path.normpath('techno/missing.wav')]
  assert 'not listed' in reasons[ds.clips[-1].path]


def test_flat_folder_is_unlabelled(tmp_path):
  sample_data.write_folder(str(tmp_path / 'x'), songs_per_genre=1, seconds=2.0, genres=('ambient', 'techno'))
  flat = tmp_path / 'flat'
  flat.mkdir()
  for genre in ('ambient', 'techno'):
    for f in os.listdir(tmp_path / 'x' / genre):
      shutil.copy(tmp_path / 'x' / genre / f, flat / f)
  ds = datasets.read_dataset('folder', str(flat))
  assert ds.labels == [] and {c.label for c in ds.clips} == {''} and len(ds.clips) == 2


def test_loose_files_beside_class_folders_are_an_error(music_dir, tmp_path):
  root = tmp_path / 'mixed'
  shutil.copytree(music_dir, root)
  shutil.copy(root / 'techno' / 'techno_00.wav', root / 'loose.wav')
  with pytest.raises(datasets.DatasetError, match='loose'):
    datasets.read_dataset('folder', str(root))


def test_unknown_dataset_and_missing_dir_name_the_flag(tmp_path):
  with pytest.raises(datasets.DatasetError, match='--dataset'):
    datasets.read_dataset('gtzan', str(tmp_path))
  with pytest.raises(datasets.DatasetError, match='--data_dir'):
    datasets.read_dataset('folder', str(tmp_path / 'nope'))
