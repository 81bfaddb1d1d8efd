"""Faults a user can run into, each stated as what dem_jax does about it: nothing wrong is stored, nothing is lost.

Preprocessing, the dataset readers, the feature store and checkpoints; each case uses a few seconds of generated
audio in the real on-disk layouts.
"""

import concurrent.futures
import concurrent.futures.process
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
import soundfile

from dem_jax.configs import features as features_config
from dem_jax import checkpoint as checkpoint_lib
from dem_jax import datasets
from dem_jax import features as features_lib
from dem_jax.preprocess import job
from dem_jax.preprocess import sample_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config():
  config = features_config.get_config()
  config.storage.update(chunk_frames=128, shard_frames=1024)  # One 10-s clip per block.
  return config


def run_job(data_dir, out, dataset='dcase2018_task5', **kw):
  return job.run(kw.pop('config', small_config()), dataset=dataset, data_dir=str(data_dir), output_dir=str(out), **kw)


def cli(*args):
  return subprocess.run([sys.executable, '-m', 'dem_jax', 'preprocess', *args], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture
def tiny_dcase(tmp_path):
  """Four 10-s clips: two sessions of two clips, labels absence and working."""
  root = tmp_path / 'dcase'
  sample_data.write_dcase2018_task5(str(root), labels=('absence', 'working'), sessions_per_label=1,
                                    clips_per_session=2, nodes=1, seed=3)
  return root


def clip_names(root):
  return sorted(os.listdir(root / 'audio'))


def all_stored_frames(out):
  feats = features_lib.open_features(str(out))
  return feats, np.concatenate([feats.read(c.clip_id) for c in feats.clips])


# Finite values only.

def test_huge_finite_samples_fail_that_clip_and_the_store_holds_only_finite_values(tiny_dcase, tmp_path):
  name = clip_names(tiny_dcase)[1]
  signs = np.where(np.random.default_rng(0).random((160000, 4)) < 0.5, -1, 1).astype(np.float32)
  soundfile.write(tiny_dcase / 'audio' / name, 3e38 * signs, 16000, subtype='FLOAT')  # Finite, but log-Mel is not.
  summary = run_job(tiny_dcase, tmp_path / 'out')
  assert [os.path.basename(f['path']) for f in summary['failures']] == [name]
  assert 'not finite' in summary['failures'][0]['reason']
  assert summary['clips_written'] == 3
  feats, frames = all_stored_frames(tmp_path / 'out')
  assert np.isfinite(frames).all() and frames.shape == (3 * 998, 128)
  mean, std = feats.norm_stats()
  assert np.isfinite(mean).all() and np.isfinite(std).all()


def test_non_finite_statistics_are_refused_by_the_store_and_by_finalize(tiny_dcase, tmp_path):
  out = tmp_path / 'out'
  run_job(tiny_dcase, out)
  info_path = out / features_lib.INFO_NAME
  info = json.loads(info_path.read_text())
  split = sorted(info['band_sums'])[0]
  info['band_sums'][split]['sum_sq'][3] = float('inf')
  info_path.write_text(json.dumps(info))
  with pytest.raises(features_lib.FeaturesError, match=str(out)):
    features_lib.open_features(str(out)).norm_stats()

  marker = out / job.WORK_DIR / 'blocks' / 'block-000000.json'
  block = json.loads(marker.read_text())
  block['sums'][next(iter(block['sums']))]['sum'][0] = float('nan')
  marker.write_text(json.dumps(block))
  with pytest.raises(job.PreprocessError, match='block-000000.json holds non-finite band sums'):
    run_job(tiny_dcase, out, finalize_only=True)


# What the readers refuse or report.

def test_list_paths_outside_the_data_root_are_reported_not_read(tiny_dcase, tmp_path):
  outside = tmp_path / 'secret.wav'
  shutil.copy(tiny_dcase / 'audio' / clip_names(tiny_dcase)[0], outside)
  with open(tiny_dcase / 'meta.txt', 'a') as f:
    f.write(f'\n{outside}\tabsence\tx\n../secret.wav\tabsence\tx\naudio/../../secret.wav\tabsence\tx')
  with open(tiny_dcase / 'evaluation_setup' / 'fold1_evaluate.txt', 'a') as f:
    f.write('../../elsewhere.wav\tabsence\n')
  ds = datasets.read_dataset('dcase2018_task5', str(tiny_dcase))
  assert len(ds.clips) == 4 and all(not c.path.startswith(('/', '..')) for c in ds.clips)
  refused = {p['path']: p['reason'] for p in ds.problems}
  assert set(refused) == {str(outside), '../secret.wav', 'audio/../../secret.wav', '../../elsewhere.wav'}
  assert 'fold1_evaluate.txt:' in refused['../../elsewhere.wav']
  assert 'absolute' in refused[str(outside)] and "'..'" in refused['../secret.wav']


def test_split_file_paths_outside_the_data_root_are_reported_not_read(music_dir, tmp_path):
  ds = datasets.read_dataset('folder', music_dir)
  split = tmp_path / 'split.csv'
  split.write_text('file,split\n' + ''.join(f'{c.path},train\n' for c in ds.clips) + '../../etc/x.wav,test\n')
  listed = datasets.read_dataset('folder', music_dir, split_file=str(split))
  assert len(listed.clips) == len(ds.clips)
  assert [p['path'] for p in listed.problems] == ['../../etc/x.wav']


def test_symlinked_class_folders_are_followed_and_a_loop_is_reported(tmp_path):
  sample_data.write_folder(str(tmp_path / 'elsewhere'), songs_per_genre=2, seconds=1.0, genres=('ambient', 'techno'))
  root = tmp_path / 'data'
  root.mkdir()
  shutil.copytree(tmp_path / 'elsewhere' / 'ambient', root / 'ambient')
  os.symlink(tmp_path / 'elsewhere' / 'techno', root / 'techno')  # A class folder that is a link: read.
  os.symlink(root / 'ambient', root / 'ambient' / 'again')  # A loop: read once, reported.
  ds = datasets.read_dataset('folder', str(root))
  assert ds.labels == ['ambient', 'techno']
  assert sorted(c.label for c in ds.clips) == ['ambient', 'ambient', 'techno', 'techno']
  assert [p['path'] for p in ds.problems] == [os.path.join('ambient', 'again')]
  assert 'same folder as ambient' in ds.problems[0]['reason']


def test_non_utf8_lists_and_folder_names_are_a_dataset_error_naming_them(tiny_dcase, music_dir, tmp_path):
  meta = tiny_dcase / 'meta.txt'
  lines = meta.read_bytes().split(b'\n')
  lines[2] = lines[2].replace(b'absence', b'abs\xe9nce').replace(b'working', b'work\xe9ng')
  meta.write_bytes(b'\n'.join(lines))
  with pytest.raises(datasets.DatasetError, match=r'meta\.txt:3: not UTF-8 text \(byte 0xe9'):
    datasets.read_dataset('dcase2018_task5', str(tiny_dcase))

  root = tmp_path / 'music'
  shutil.copytree(music_dir, root)
  os.rename(root / 'techno', os.path.join(os.fsencode(root), b'techn\xf6'))
  with pytest.raises(datasets.DatasetError, match=r"techn\\xf6.*not UTF-8; rename"):
    datasets.read_dataset('folder', str(root))


def test_dcase_labels_come_from_meta_txt(tiny_dcase, caplog):
  ds = datasets.read_dataset('dcase2018_task5', str(tiny_dcase))
  assert ds.labels == list(datasets.DCASE_LABELS) and not ds.warnings  # DCASE labels: the nine, in their order.
  meta = tiny_dcase / 'meta.txt'
  meta.write_text(meta.read_text().replace('\tworking\t', '\tgardening\t'))
  ds = datasets.read_dataset('dcase2018_task5', str(tiny_dcase))
  assert ds.labels == ['absence', 'gardening']  # Any label set: the labels found, sorted.
  assert {c.label for c in ds.clips} == {'absence', 'gardening'}
  assert len(ds.warnings) == 1 and 'gardening' in ds.warnings[0] and 'working' in ds.warnings[0]
  assert 'gardening' in caplog.text


# The plan and the output folder.

def test_a_rerun_after_the_audio_changed_is_refused_and_the_store_kept(tiny_dcase, tmp_path):
  out = tmp_path / 'out'
  run_job(tiny_dcase, out)
  before = (out / features_lib.MANIFEST_NAME).read_bytes()
  clip = tiny_dcase / 'audio' / clip_names(tiny_dcase)[2]
  y, sr = soundfile.read(clip)
  soundfile.write(clip, y[:sr * 5], sr)
  with pytest.raises(job.PreprocessError, match=r'changed since its plan.*1 clip\(s\) modified.*delete the folder'):
    run_job(tiny_dcase, out)
  (tiny_dcase / 'meta.txt').write_text((tiny_dcase / 'meta.txt').read_text() + '\n')
  with pytest.raises(job.PreprocessError, match='meta.txt changed'):
    run_job(tiny_dcase, out)
  assert (out / features_lib.MANIFEST_NAME).read_bytes() == before


def test_a_stale_plan_with_nothing_written_is_planned_again(tiny_dcase, tmp_path):
  out = tmp_path / 'out'
  job.load_or_make_plan(str(out), job.settings_from_config(small_config(), 'dcase2018_task5', str(tiny_dcase), None))
  clip = tiny_dcase / 'audio' / clip_names(tiny_dcase)[0]
  y, sr = soundfile.read(clip)
  soundfile.write(clip, y[:sr * 5], sr)  # The audio changes before any block was written.
  summary = run_job(tiny_dcase, out)
  assert summary['clips_written'] == 4 and not summary['failures'] and not summary['warnings']
  assert features_lib.open_features(str(out)).clip(clip.stem).num_frames == 498  # Planned for the new audio.


def test_folders_that_are_not_this_jobs_are_refused(tiny_dcase, tmp_path):
  finished = tmp_path / 'finished'
  run_job(tiny_dcase, finished)
  shutil.rmtree(finished / job.WORK_DIR)  # A finished store without its plan (an older one, or tidied up).
  with pytest.raises(job.PreprocessError, match='holds a feature store this job did not plan'):
    run_job(tiny_dcase, finished)
  other = tmp_path / 'home'
  other.mkdir()
  (other / 'notes.txt').write_text('mine')
  with pytest.raises(job.PreprocessError, match=r'holds other files \(notes.txt\)'):
    run_job(tiny_dcase, other)
  assert (other / 'notes.txt').read_text() == 'mine' and os.listdir(other) == ['notes.txt']


def test_array_tasks_started_together_give_the_single_run_output(tiny_dcase, tmp_path):
  single = tmp_path / 'single'
  run_job(tiny_dcase, single)
  together = tmp_path / 'together'
  with concurrent.futures.ThreadPoolExecutor(3) as pool:  # Each plans or waits for the one planning.
    list(pool.map(lambda i: run_job(tiny_dcase, together, task_index=i, num_tasks=3), range(3)))
  run_job(tiny_dcase, together, finalize_only=True)
  for name in (features_lib.MANIFEST_NAME, features_lib.INFO_NAME):
    assert (single / name).read_bytes() == (together / name).read_bytes()
  np.testing.assert_array_equal(all_stored_frames(single)[1], all_stored_frames(together)[1])


@pytest.mark.skipif(os.geteuid() == 0, reason='root may write to a read-only folder')
def test_a_read_only_output_folder_is_one_clear_error(tiny_dcase, tmp_path):
  out = tmp_path / 'ro'
  out.mkdir()
  out.chmod(0o555)
  with pytest.raises(job.PreprocessError, match='not writable'):
    run_job(tiny_dcase, out)


def test_a_store_whose_manifest_is_missing_or_foreign_is_refused_with_the_fix(tiny_dcase, tmp_path):
  out = tmp_path / 'out'
  run_job(tiny_dcase, out)
  manifest = out / features_lib.MANIFEST_NAME
  text = manifest.read_text()
  manifest.write_text(text.replace('absence', 'working', 1))
  with pytest.raises(features_lib.FeaturesError, match='does not match features.json.*--finalize'):
    features_lib.open_features(str(out))
  manifest.unlink()
  with pytest.raises(features_lib.FeaturesError, match='no manifest.csv.*--finalize'):
    features_lib.open_features(str(out))
  run_job(tiny_dcase, out, finalize_only=True)  # The fix the message names.
  assert len(features_lib.open_features(str(out))) == 4


def test_a_wav_shorter_than_its_header_is_kept_with_a_warning(tiny_dcase, tmp_path):
  name = clip_names(tiny_dcase)[0]
  path = tiny_dcase / 'audio' / name
  data = path.read_bytes()
  path.write_bytes(data[:44 + 4 * 2 * 16000 * 4])  # 4 of its 10 s (16-bit, 4 channels).
  summary = run_job(tiny_dcase, tmp_path / 'out')
  warned = [w['reason'] for w in summary['warnings'] if os.path.basename(w['path']) == name]
  assert warned == ['truncated: the header promises 160000 samples per channel, the file holds 64000; kept the '
                    '64000 read']
  feats = features_lib.open_features(str(tmp_path / 'out'))
  assert feats.clip(name[:-4]).num_frames == 398 and summary['clips_written'] == 4


def _children(pid):
  found = set()
  for task in os.listdir(f'/proc/{pid}/task'):
    with open(f'/proc/{pid}/task/{task}/children') as f:
      found |= {int(p) for p in f.read().split()}
  return found


def _alive(pid):
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_workers_die_with_a_parent_killed_by_sigkill(tmp_path):
  data = tmp_path / 'data'
  sample_data.write_dcase2018_task5(str(data), labels=('absence', 'working'), sessions_per_label=4,
                                    clips_per_session=3, nodes=1, seed=4)
  out = tmp_path / 'out'
  proc = subprocess.Popen([sys.executable, '-m', 'dem_jax', 'preprocess', '--dataset=dcase2018_task5', f'--data_dir={data}',
                           f'--output_dir={out}', '--num_workers=2', '--config.storage.chunk_frames=128',
                           '--config.storage.shard_frames=1024'], cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  markers = out / job.WORK_DIR / 'blocks'
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if markers.is_dir() and any(m.endswith('.json') for m in os.listdir(markers)):
      break  # The workers are running blocks.
    time.sleep(0.01)
  workers = _children(proc.pid)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert len(workers) >= 2, 'the workers must have started before the kill'
  deadline = time.time() + 10
  while time.time() < deadline and any(_alive(w) for w in workers):
    time.sleep(0.1)
  assert not any(_alive(w) for w in workers)


# Every bad run of the command: one line naming the file or setting, a documented exit code, no traceback.

def test_bad_runs_of_the_command_end_in_one_line_with_the_fix(tiny_dcase, tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  (tiny_dcase / 'meta.txt').write_bytes((tiny_dcase / 'meta.txt').read_bytes() + b'\n\xff\tabsence\tx')
  data = f'--data_dir={tiny_dcase}'
  cases = {
      'is a file, not a folder': ['--dataset=folder', data, f'--output_dir={a_file}'],
      'cannot create --output_dir': ['--dataset=folder', data, f'--output_dir={a_file / "features"}'],
      'not UTF-8 text': ['--dataset=dcase2018_task5', data, f'--output_dir={tmp_path / "o1"}'],
      'compression': ['--dataset=folder', data, f'--output_dir={tmp_path / "o2"}',
                      '--config.storage.compression=gzip'],
      'frontend': ['--dataset=folder', data, f'--output_dir={tmp_path / "o3"}', '--config.frontend.fmax=9000'],
      'No such file': ['--dataset=folder', data, f'--output_dir={tmp_path / "o4"}', f'--config={tmp_path / "x.py"}'],
  }
  for expected, args in cases.items():
    result = cli(*args)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and 'Traceback' not in result.stderr, (expected, result.stderr[-2000:])
    assert last.startswith('preprocess: ') and expected in last, (expected, last)


# Checkpoints.

def _state(step, value=None):
  return {'params': {'kernel': np.full((64, 8), step if value is None else value, np.float32)}, 'step': np.int32(step)}


def _flip_bytes(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs if f != checkpoint_lib.DIGEST_NAME]
  largest = max(files, key=os.path.getsize)
  data = bytearray(open(largest, 'rb').read())
  data[len(data) // 2] ^= 0xFF
  open(largest, 'wb').write(bytes(data))


def test_a_damaged_checkpoint_is_skipped_for_the_newest_intact_one(tmp_path, caplog):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), save_every=1)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step))
  ckpt.close()
  _flip_bytes(tmp_path / checkpoint_lib.CHECKPOINT_DIR / '3')
  reader = checkpoint_lib.Checkpointer(str(tmp_path), read_only=True)
  assert reader.all_steps() == [1, 2, 3] and reader.latest_step() == 2
  assert 'step 3' in caplog.text and 'damaged' in caplog.text
  restored = reader.restore(_state(0))
  assert restored['params']['kernel'][0, 0] == 2.0 and restored['step'] == 2
  with pytest.raises(checkpoint_lib.CheckpointError, match='step 3 .* damaged'):
    reader.restore_raw(3)


def test_non_finite_states_are_never_saved_and_count_as_damaged_where_found(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), save_every=1, max_to_keep=1)
  ckpt.save(1, _state(1))
  with pytest.raises(checkpoint_lib.CheckpointError, match=r'step 2 holds non-finite .*not saved.*newest intact: 1'):
    ckpt.save(2, _state(2, np.nan))
  ckpt.close()
  assert ckpt.all_steps() == [1]  # Nothing written, so max_to_keep=1 pruned nothing.
  # Non-finite steps written otherwise (as an older dem_jax did): one whose digest says so, one without a digest.
  directory = tmp_path / checkpoint_lib.CHECKPOINT_DIR
  with ocp.CheckpointManager(str(directory)) as manager:
    for step, value in ((2, np.nan), (3, np.inf)):
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_state(step, value))))
  digest = {'step': 2, 'sha256': checkpoint_lib.files_digest(str(directory / '2')), 'finite': False}
  (directory / '2' / checkpoint_lib.DIGEST_NAME).write_text(json.dumps(digest))
  reader = checkpoint_lib.Checkpointer(str(tmp_path), read_only=True)
  assert reader.latest_step() == 3  # Nothing recorded against it...
  assert reader.restore_raw()['params']['kernel'][0, 0] == 1.0  # ...but its values are checked: step 1 is used.


def test_a_read_only_checkpointer_creates_and_deletes_nothing(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  reader = checkpoint_lib.Checkpointer(str(empty), read_only=True)
  assert reader.latest_step() is None and os.listdir(empty) == []
  with pytest.raises(checkpoint_lib.CheckpointError, match='read-only'):
    reader.save(1, _state(1), force=True)

  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), save_every=1, max_to_keep=5)
  for step in (1, 2, 3, 4):
    ckpt.save(step, _state(step))
  ckpt.close()
  directory = tmp_path / checkpoint_lib.CHECKPOINT_DIR
  in_flight = directory / '5.orbax-checkpoint-tmp-1234'  # A save in progress in another process.
  in_flight.mkdir()
  listing = sorted(os.listdir(directory))
  reader = checkpoint_lib.Checkpointer(str(tmp_path), read_only=True, max_to_keep=2)
  assert reader.latest_step() == 4
  reader.restore_raw()
  reader.close()
  assert sorted(os.listdir(directory)) == listing and in_flight.is_dir()


def test_split_values_other_than_train_and_test_are_refused_naming_the_line(music_dir, tmp_path):
  ds = datasets.read_dataset('folder', music_dir)
  split = tmp_path / 'split.csv'
  rows = [f'{c.path},{"Test" if i % 3 == 0 else "train"}\n' for i, c in enumerate(ds.clips)]
  split.write_text('file,split\n' + ''.join(rows))
  folded = datasets.read_dataset('folder', music_dir, split_file=str(split))
  assert {c.split for c in folded.clips} == {'train', 'test'} and not folded.problems
  assert [w for w in folded.warnings if 'not lower case' in w and f'{split}:2' in w]
  rows[2] = f'{ds.clips[2].path},validation\n'
  split.write_text('file,split\n' + ''.join(rows))
  with pytest.raises(datasets.DatasetError, match=f"{split}:4: split 'validation'.*train or test"):
    datasets.read_dataset('folder', music_dir, split_file=str(split))


def test_a_nul_byte_in_a_list_path_is_reported_not_read(tiny_dcase):
  with open(tiny_dcase / 'meta.txt', 'a') as f:
    f.write('\naudio/x\0y.wav\tabsence\tx')
  ds = datasets.read_dataset('dcase2018_task5', str(tiny_dcase))
  assert [p['reason'] for p in ds.problems if '\0' in p['path']] == [f'{tiny_dcase}/meta.txt:{len(ds.clips) + 1}: '
                                                                     'holds a NUL byte, which no file name can; not read']


def test_a_dcase_clip_in_no_evaluate_list_is_a_warning_not_a_failure(tiny_dcase):
  evaluate = tiny_dcase / 'evaluation_setup' / 'fold1_evaluate.txt'
  lines = evaluate.read_text().splitlines()
  evaluate.write_text('\n'.join(lines[1:]) + '\n')
  ds = datasets.read_dataset('dcase2018_task5', str(tiny_dcase))
  assert not ds.problems and [c.split for c in ds.clips].count('none') == 1
  assert [w for w in ds.warnings if '1 clip(s) of meta.txt are in no fold*_evaluate.txt' in w]


def test_special_files_and_link_loops_are_skipped_with_their_reason_never_opened(tmp_path):
  fifo, loop = tmp_path / 'x.wav', tmp_path / 'loop.wav'
  os.mkfifo(fifo)
  os.symlink(loop, loop)
  (tmp_path / 'folder.wav').mkdir()
  # In a process of its own: opening the FIFO for reading would block for ever.
  script = ('import sys\nfrom dem_jax import audio\n'
            'for path in sys.argv[1:]:\n'
            '  for read in (audio.audio_info, lambda p: audio.read_audio(p, 16000)):\n'
            '    try:\n      read(path)\n    except audio.AudioError as e:\n      print(e.reason)\n')
  result = subprocess.run([sys.executable, '-c', script, str(fifo), str(loop), str(tmp_path / 'folder.wav')],
                          capture_output=True, text=True, timeout=120)
  reasons = result.stdout.splitlines()
  assert len(reasons) == 6, result.stderr[-2000:]
  assert reasons[0] == reasons[1] == 'a FIFO (named pipe), not an audio file; skipped, never opened'
  assert reasons[2] == reasons[3] and 'symbolic link loop' in reasons[2]
  assert reasons[4].startswith('a folder, not an audio file')


# The operating system's errors and settings that cannot be right, through the commands.

def dem_jax_command(*args, **kw):
  return subprocess.run([sys.executable, '-m', 'dem_jax', *args], cwd=ROOT, capture_output=True, text=True, **kw)


def test_config_mistakes_end_in_one_line_naming_the_setting(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('def get_config(:\n')
  cases = {
      'names no field of the config (\'modle\' Did you mean "model"': ['--config=dcase:tiny', '--config.modle.width=1'],
      "--config.num_steps=abc: invalid literal for int()": ['--config=dcase:tiny', '--config.num_steps=abc'],
      "Unknown config argument 'tny'": ['--config=dcase:tny'],
      'No such file or directory': [f'--config={tmp_path / "none.py"}'],
      f'--config: {bad} line 1: invalid syntax': [f'--config={bad}'],
  }
  for expected, args in cases.items():
    result = dem_jax_command('train', *args, f'--workdir={tmp_path / "w"}')
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith('train: '), (expected, result.stderr)
    assert expected in lines[0], (expected, lines[0])
  assert not (tmp_path / 'w').exists()
  # A mistake inside the config file itself is the file's own, with its traceback, not taken for an override.
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config(arg=None):\n  return {}["k"]\n')
  result = dem_jax_command('train', f'--config={broken}', '--config.seed=1', f'--workdir={tmp_path / "w"}')
  assert result.returncode == 1 and "KeyError: 'k'" in result.stderr and 'names no field' not in result.stderr
  result = dem_jax_command('preprocess', '--dataset=folder', f'--data_dir={tmp_path}', f'--output_dir={tmp_path / "f"}',
                           '--config.frontend.n_mels=0')
  assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith('preprocess: --config.frontend:')
  assert 'frontend.n_mels=0' in result.stderr and not (tmp_path / 'f').exists()


def test_os_errors_become_one_line_with_the_path_and_the_fix():
  import errno
  from dem_jax import cli
  line = cli.os_error_line(OSError(errno.ENOSPC, 'No space left on device', '/data/out/x.npz'))
  assert line.startswith('No space left on device (/data/out/x.npz); free space there')
  assert 'run the same command again' in line
  assert 'permissions' in cli.os_error_line(PermissionError(errno.EACCES, 'Permission denied', '/x'))


@pytest.fixture
def small_disk(tmp_path, request):
  """A 64-KiB tmpfs (or the size a test passes as the fixture's param): a full disk for real (needs root and a
  kernel that lets it mount)."""
  mount = tmp_path / 'disk'
  mount.mkdir()
  size = getattr(request, 'param', '64k')
  result = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(mount)], capture_output=True,
                          text=True)
  if result.returncode:
    pytest.skip(f'cannot mount a small tmpfs here ({result.stderr.strip() or "not root"})')
  yield mount
  subprocess.run(['umount', str(mount)], check=False)


def test_a_full_disk_ends_preprocessing_in_one_line_and_the_rerun_finishes(tiny_dcase, small_disk, tmp_path):
  result = dem_jax_command('preprocess', '--dataset=dcase2018_task5', f'--data_dir={tiny_dcase}',
                           f'--output_dir={small_disk / "features"}', '--num_workers=1')
  last = result.stderr.strip().splitlines()[-1]
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert last.startswith('preprocess: ') and 'No space left on device' in last and 'free space' in last, last
  # Room made: the same command, pointed at a disk with space, finishes.
  shutil.copytree(small_disk / 'features', tmp_path / 'features')
  result = dem_jax_command('preprocess', '--dataset=dcase2018_task5', f'--data_dir={tiny_dcase}',
                           f'--output_dir={tmp_path / "features"}', '--num_workers=1')
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.strip().splitlines()[-1])['clips_written'] == 4


# Room for config.json, model.json, the log and one checkpoint of the tiny model, not for two.
@pytest.mark.parametrize('small_disk', ['3m'], indirect=True)
def test_a_full_disk_stops_training_in_one_line_and_the_rerun_resumes(dcase_features, small_disk, tmp_path):
  def train(workdir, steps):
    return dem_jax_command('train', '--config=dcase:tiny', f'--workdir={workdir}',
                           f'--config.features_dir={dcase_features}', '--config.data.tile_seconds=0.5', '--config.data.neighbour_seconds=0.5',
                           '--config.batch_size=8', '--config.data.eval_batches=1', '--config.data.eval_max_clips=16',
                           f'--config.num_steps={steps}', '--config.checkpoint_every=2', '--config.log_every=1',
                           env=dict(os.environ, JAX_NUM_CPU_DEVICES='1'))

  workdir = small_disk / 'w'
  result = train(workdir, 6)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  # The save of step 4 failed: training stopped there, in one line, and orbax's own reports of it were held back.
  assert [line for line in lines if 'No space left' in line or line.startswith('E')] == [lines[-1]], lines[-5:]
  assert lines[-1].startswith(f'train: No space left on device ({workdir / "checkpoints"}); free space there')
  assert os.listdir(workdir / 'checkpoints') == ['2']  # The intact step; nothing half-written beside it.
  assert max(r['step'] for r in map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines())) == 4
  # Room made: the same command resumes from step 2 and finishes.
  shutil.copytree(workdir, tmp_path / 'roomy')
  result = train(tmp_path / 'roomy', 6)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resumed from the checkpoint of step 2 ' in result.stderr
  assert checkpoint_lib.Checkpointer(str(tmp_path / 'roomy'), read_only=True).latest_step() == 6


@pytest.mark.parametrize('error,code,expected', [
    (KeyboardInterrupt(), 130, 'interrupted; run the same command again'),
    (concurrent.futures.process.BrokenProcessPool('gone'), 1, 'a worker process died'),
    (PermissionError(13, 'Permission denied', '/data/x'), 1, 'Permission denied (/data/x); fix its permissions'),
])
def test_every_command_ends_in_one_line_on_interrupts_dead_workers_and_os_errors(error, code, expected, monkeypatch,
                                                                                capsys):
  import types
  from dem_jax import cli

  def main(argv):
    raise error
  monkeypatch.setitem(sys.modules, 'dem_jax.commands.anything',
                      types.SimpleNamespace(main=main, PARSES_ITS_OWN_ARGUMENTS=True))
  with pytest.raises(SystemExit) as exit_info:
    cli.run('anything', [])
  assert exit_info.value.code == code
  assert capsys.readouterr().err.startswith(f'anything: {expected}')


def test_refused_runs_leave_no_output_folder_and_a_bad_task_index_writes_nothing(tiny_dcase, tmp_path):
  out = tmp_path / 'features'
  with pytest.raises(datasets.DatasetError):
    run_job(tmp_path / 'no_such_data', out)
  assert not out.exists()
  with pytest.raises(job.PreprocessError, match='--task_index=3 must lie in'):
    run_job(tiny_dcase, out, task_index=3, num_tasks=2)
  assert not out.exists()
  (tiny_dcase / 'meta.txt').unlink()
  (tiny_dcase / 'meta.txt').mkdir()  # an operating-system error while the lists are read
  with pytest.raises(job.PreprocessError, match='meta.txt: Is a directory'):
    run_job(tiny_dcase, out)
  assert not out.exists()


def test_a_damaged_block_marker_names_itself_and_costs_only_its_block(tiny_dcase, tmp_path):
  out = tmp_path / 'features'
  run_job(tiny_dcase, out)
  marker = out / job.WORK_DIR / 'blocks' / 'block-000001.json'
  marker.write_text(marker.read_text()[:20])
  with pytest.raises(job.PreprocessError, match=f'{marker} is damaged.*delete that file.*redoes that block'):
    job.finalize(str(out))
  marker.unlink()
  before = features_lib.open_features(str(out)).clips
  assert run_job(tiny_dcase, out)['clips_written'] == len(before)


def test_a_store_with_a_missing_or_short_shard_file_is_refused_at_open(tiny_dcase, tmp_path):
  out = tmp_path / 'features'
  run_job(tiny_dcase, out)
  recorded = json.loads((out / features_lib.INFO_NAME).read_text())['store_files']
  shards = sorted(rel for rel in recorded if rel.startswith('c/'))
  assert len(shards) >= 2
  broken = tmp_path / 'copy'
  shutil.copytree(out, broken)
  (broken / features_lib.ARRAY_NAME / shards[1]).unlink()
  with pytest.raises(features_lib.FeaturesError, match=f'{shards[1]} is missing: the feature store .* is not whole'):
    features_lib.open_features(str(broken))
  shutil.copy(out / features_lib.ARRAY_NAME / shards[1], broken / features_lib.ARRAY_NAME / shards[1])
  with open(broken / features_lib.ARRAY_NAME / shards[0], 'r+b') as f:
    f.truncate(100)
  with pytest.raises(features_lib.FeaturesError, match=f'{shards[0]} holds 100 bytes, {recorded[shards[0]]} were'):
    features_lib.open_features(str(broken))
  assert len(features_lib.open_features(str(out)).clips) == 4


def test_training_refuses_a_store_whose_split_words_no_reader_writes():
  assert features_lib.training_splits(['train', 'test']) == ['train']
  assert features_lib.training_splits(['fold1', 'fold2', 'none'], fold=1) == ['fold2', 'none']
  with pytest.raises(features_lib.FeaturesError, match=r"split\(s\) \['Test', 'Train'\], which no reader writes"):
    features_lib.training_splits(['Train', 'Test'])


def test_a_failed_save_is_an_os_error_only_when_the_system_refused_the_write(tmp_path, monkeypatch):
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), save_every=1)

  def refuse(*args, **kwargs):
    raise ValueError('UNKNOWN: Error writing local file "x": [os_error_code=\'28\'] No space left on device')
  monkeypatch.setattr(checkpointer.manager, 'save', refuse)
  with pytest.raises(OSError) as raised:
    checkpointer.save(1, _state(1))
  assert raised.value.errno == 28 and raised.value.filename == checkpointer.directory

  def bug(*args, **kwargs):
    raise TypeError('a bug in the caller')
  monkeypatch.setattr(checkpointer.manager, 'save', bug)
  with pytest.raises(TypeError, match='a bug in the caller'):  # not turned into a one-line "run again"
    checkpointer.save(2, _state(2))


@pytest.mark.parametrize('small_disk', ['16k'], indirect=True)
def test_a_full_disk_ends_embed_in_one_line_and_leaves_no_partial_file(tiny_workdir, tiny_dcase, small_disk):
  result = dem_jax_command('embed', f'--workdir={tiny_workdir}', f'--input={tiny_dcase / "audio"}',
                           f'--output_dir={small_disk / "embeddings"}', '--trunk')
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert lines[-1].startswith('embed: No space left on device (') and '.npz)' in lines[-1], lines[-1]
  left = [n for _, _, names in os.walk(small_disk) for n in names]
  assert all(n.endswith('.npz') for n in left), left  # whole outputs only, no partial file
