"""Embedding in-memory audio and folders of files, on a tiny random network; the embed command's bad-input lines."""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from dem_jax import embed
from dem_jax.embed import EmbedError
from test_hear import random_embedder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = 16000


@pytest.fixture(scope='module')
def embedder():
  return random_embedder()


def sound(seconds, seed=0, rate=SR):
  return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(np.float32)


def test_embed_audio_gives_tiles_their_start_and_centre(embedder):
  out = embedder.embed_audio(sound(3.0), SR)
  n = len(out['timestamps'])
  assert n == 3 and out['embeddings'].shape == (3, 16)  # 1-s tiles on a 1-s grid
  np.testing.assert_allclose(out['timestamps'], [0.0, 1.0, 2.0], atol=1e-6)
  # A tile of 98 frames spans 97 hops and one 30-ms window: 1.0 s; its centre is half of that after its start.
  np.testing.assert_allclose(out['centre_timestamps'] - out['timestamps'], embedder.tile_seconds / 2, atol=1e-6)
  assert embedder.tile_seconds == pytest.approx(1.0)
  np.testing.assert_allclose(np.linalg.norm(out['clip_embedding']), 1.0, rtol=1e-5)
  mean = out['embeddings'].mean(axis=0)
  np.testing.assert_allclose(out['clip_embedding'], mean / np.linalg.norm(mean), atol=1e-6)


def test_embed_audio_takes_channels_and_other_rates(embedder):
  mono = sound(2.5, seed=1)
  stereo = np.stack([mono, mono], axis=1)
  np.testing.assert_allclose(embedder.embed_audio(stereo, SR)['embeddings'],
                             embedder.embed_audio(mono, SR)['embeddings'], atol=1e-6)
  # The same sound at 32 kHz (a smooth signal, so that resampling changes little) lands on the same tiles and point.
  t = np.arange(int(2.5 * 32000)) / 32000
  high = (0.3 * np.sin(2 * np.pi * 440 * t) * np.sin(2 * np.pi * 1.5 * t)).astype(np.float32)
  at_32k, at_16k = embedder.embed_audio(high, 32000), embedder.embed_audio(high[::2], SR)
  np.testing.assert_allclose(at_32k['timestamps'], at_16k['timestamps'])
  assert np.all(np.sum(at_32k['embeddings'] * at_16k['embeddings'], axis=1) > 0.99)


def test_embed_audio_refuses_what_would_embed_garbage(embedder):
  bad = sound(1.0)
  bad[5] = np.inf
  with pytest.raises(EmbedError, match='NaN or infinite samples'):
    embedder.embed_audio(bad, SR)
  # Finite samples whose spectrum overflows float32: the log-Mel is not finite.
  with pytest.raises(EmbedError, match='log-Mel spectrogram holds NaN or infinite'):
    embedder.embed_audio(np.full(SR, 3e38, np.float32), SR)
  with pytest.raises(EmbedError, match=r'\[samples\] or \[samples, channels\]'):
    embedder.embed_audio(np.zeros((2, 2, SR), np.float32), SR)


def test_integer_pcm_is_scaled_as_soundfile_scales_it(embedder, tmp_path):
  from scipy.io import wavfile
  samples = sound(1.5, seed=5)
  for subtype, dtype in (('PCM_16', np.int16), ('PCM_32', np.int32), ('PCM_U8', np.uint8)):
    path = tmp_path / f'{subtype}.wav'
    soundfile.write(path, samples, SR, subtype=subtype)
    _, pcm = wavfile.read(path)  # integers, as scipy returns them
    as_float, _ = soundfile.read(path, dtype='float32')
    assert pcm.dtype == dtype
    np.testing.assert_allclose(embed.as_float_samples(pcm), as_float, rtol=1e-6, atol=1e-9, err_msg=subtype)
    if dtype == np.int16:  # what scipy.io.wavfile.read gives for most WAV files
      np.testing.assert_allclose(embedder.embed_audio(pcm, SR)['embeddings'],
                                 embedder.embed_audio(as_float, SR)['embeddings'], atol=1e-5)
  np.testing.assert_array_equal(embed.as_float_samples(np.array([-128, 0, 64], np.int8)), [-1.0, 0.0, 0.5])
  with pytest.raises(EmbedError, match='dtype int64'):
    embedder.embed_audio(np.zeros(SR, np.int64), SR)


def test_channels_first_and_empty_audio_are_refused_with_the_fix(embedder):
  mono = sound(1.0)
  for channels_first in (np.stack([mono, mono]), mono[None]):
    with pytest.raises(EmbedError, match=rf'shape \({len(channels_first)}, {SR}\).*\[channels, samples\].*samples\.T'):
      embedder.embed_audio(channels_first, SR)
  np.testing.assert_allclose(embedder.embed_audio(np.stack([mono, mono]).T, SR)['embeddings'],
                             embedder.embed_audio(mono, SR)['embeddings'], atol=1e-6)
  for empty in (np.zeros(0, np.float32), np.zeros((0, 2), np.int16)):
    with pytest.raises(EmbedError, match='empty audio: 0 samples'):
      embedder.embed_audio(empty, SR)


def test_folder_outputs_keep_the_extension_and_skip_bad_files(embedder, tmp_path):
  data = tmp_path / 'in'
  (data / 'sub').mkdir(parents=True)
  soundfile.write(data / 'x.wav', sound(1.5, seed=2), SR)
  soundfile.write(data / 'x.flac', sound(2.5, seed=3), SR)
  soundfile.write(data / 'sub' / 'loud.wav', np.full(SR, 3e38, np.float32), SR, subtype='FLOAT')
  summary = embed.embed_paths(embedder, str(data), str(tmp_path / 'out'), show_progress=False)
  assert sorted(os.path.relpath(p, tmp_path / 'out') for p in summary['written']) == ['x.flac.npz', 'x.wav.npz']
  assert np.load(tmp_path / 'out' / 'x.wav.npz')['embeddings'].shape == (2, 16)  # 0 and the end tile at 0.5 s
  assert np.load(tmp_path / 'out' / 'x.flac.npz')['embeddings'].shape == (3, 16)  # 0, 1 and the end tile at 1.5 s
  (failure,) = summary['failures']
  assert failure['path'].endswith('loud.wav') and 'log-Mel spectrogram holds NaN or infinite' in failure['reason']
  assert not (tmp_path / 'out' / 'sub').exists()  # nothing written for it


def test_tiles_cover_the_end_of_the_audio(embedder):
  assert embed.tile_starts(1200, 498, 500, cover_end=True).tolist() == [0, 500, 702]  # 702 + 498 = 1200
  assert embed.tile_starts(998, 498, 500, cover_end=True).tolist() == [0, 500]  # the grid reaches the end already
  assert embed.tile_starts(1200, 498, 500).tolist() == [0, 500]  # feature-store clips keep the plain grid
  samples = sound(2.5, seed=4)
  out = embedder.embed_audio(samples, SR)
  np.testing.assert_allclose(out['timestamps'], [0.0, 1.0, 1.5], atol=1e-6)
  # The last tile is the audio's last tile_frames frames: it ends where the audio ends.
  frames = embedder._log_mel_of_audio(samples, SR)
  last = embedder.embed_tiles(frames[None, -embedder.tile_frames:])
  np.testing.assert_allclose(out['embeddings'][-1], last[0], atol=1e-6)
  assert out['timestamps'][-1] + embedder.tile_seconds == pytest.approx(2.5, abs=0.01)


def write_clips(folder, seconds):
  folder.mkdir(parents=True, exist_ok=True)
  for i, s in enumerate(seconds):
    soundfile.write(folder / f'{i:02d}.wav', sound(s, seed=10 + i), SR)


def test_packed_batches_give_what_each_file_gives_alone(embedder, tmp_path):
  # 1 to 4 tiles per file and a batch of 8: files straddle batches, one batch is part-filled, a failure sits between.
  seconds = [2.3, 0.5, 3.0, 1.2, 2.0, 4.0, 1.0, 2.7, 1.5]
  write_clips(tmp_path / 'in', seconds)
  soundfile.write(tmp_path / 'in' / '04b_loud.wav', np.full(SR, 3e38, np.float32), SR, subtype='FLOAT')
  assert embedder.embed_tiles.batch_size == 8
  summary = embed.embed_paths(embedder, str(tmp_path / 'in'), str(tmp_path / 'out'), num_workers=3,
                              show_progress=False)
  assert len(summary['written']) == len(seconds) and summary['failures'][0]['path'].endswith('04b_loud.wav')
  for i in range(len(seconds)):
    packed = np.load(tmp_path / 'out' / f'{i:02d}.wav.npz')
    alone = embedder.embed_file(str(tmp_path / 'in' / f'{i:02d}.wav'))
    assert set(packed.files) == set(alone) | set(embed.SETTINGS)
    for key, value in alone.items():
      np.testing.assert_allclose(packed[key], value, rtol=1e-6, atol=1e-6, err_msg=f'{i:02d}.wav {key}')


def test_existing_outputs_are_kept_unless_overwrite(embedder, tmp_path):
  write_clips(tmp_path / 'in', [1.0, 2.0, 1.0])
  out = tmp_path / 'out'
  first = embed.embed_paths(embedder, str(tmp_path / 'in'), str(out), show_progress=False)
  assert len(first['written']) == 3 and not first['existing']
  # Stand-ins for results: one made with these settings, to keep; one from before settings were recorded.
  np.savez(out / '00.wav.npz', embeddings=np.zeros((1, 16), np.float32), **embed.output_settings(embedder))
  np.savez(out / '02.wav.npz', embeddings=np.zeros((1, 16), np.float32), hop_seconds=embedder.hop_seconds)
  (tmp_path / 'in' / '03.wav').write_bytes((tmp_path / 'in' / '01.wav').read_bytes())
  again = embed.embed_paths(embedder, str(tmp_path / 'in'), str(out), show_progress=False)
  assert [os.path.basename(p) for p in again['written']] == ['02.wav.npz', '03.wav.npz']
  assert [os.path.basename(p) for p in again['reembedded']] == ['02.wav.npz']
  assert sorted(os.path.basename(p) for p in again['existing']) == ['00.wav.npz', '01.wav.npz']
  assert not np.load(out / '00.wav.npz')['embeddings'].any() and np.load(out / '02.wav.npz')['embeddings'].any()
  forced = embed.embed_paths(embedder, str(tmp_path / 'in'), str(out), overwrite=True, show_progress=False)
  assert len(forced['written']) == 4 and not forced['existing'] and not forced['reembedded']
  assert np.load(out / '00.wav.npz')['embeddings'].any()
  assert sorted(os.listdir(out)) == ['00.wav.npz', '01.wav.npz', '02.wav.npz', '03.wav.npz']  # no temporary file


def test_trunk_comes_from_the_same_pass_and_a_change_of_representations_embeds_again(embedder, tmp_path):
  # 8-tile batches and 1 to 3 tiles per file: files straddle batches, and the last batch is part-filled.
  seconds = [2.3, 0.5, 3.0, 1.2, 2.0, 2.7]
  write_clips(tmp_path / 'in', seconds)
  data, out = str(tmp_path / 'in'), tmp_path / 'out'
  plain = embed.embed_paths(embedder, data, str(out), show_progress=False)
  before = {p: dict(np.load(p)) for p in plain['written']}
  assert all('trunk' not in result and result['representations'].tolist() == ['embedding']
             for result in before.values())
  # Asked for the trunk, outputs without it count as not yet written: every file is embedded again.
  summary = embed.embed_paths(embedder, data, str(out), num_workers=2, show_progress=False, trunk=True)
  assert sorted(summary['written']) == sorted(summary['reembedded']) == sorted(plain['written'])
  assert not summary['existing']
  for i in range(len(seconds)):
    packed = dict(np.load(out / f'{i:02d}.wav.npz'))
    alone = embedder.embed_file(str(tmp_path / 'in' / f'{i:02d}.wav'), trunk=True)
    assert set(packed) == set(alone) | set(embed.SETTINGS)
    for key, value in alone.items():
      np.testing.assert_allclose(packed[key], value, rtol=1e-6, atol=1e-6, err_msg=f'{i:02d}.wav {key}')
    # One row per tile, the trunk's 64 channels at width 0.125; the embeddings are those written without it.
    assert packed['trunk'].shape == (len(packed['timestamps']), 64)
    np.testing.assert_allclose(packed['clip_trunk'], packed['trunk'].mean(axis=0), rtol=1e-6)
    assert packed['representations'].tolist() == ['embedding', 'trunk']
    earlier = before[str(out / f'{i:02d}.wav.npz')]
    for key in set(earlier) - set(embed.SETTINGS):
      np.testing.assert_allclose(packed[key], earlier[key], rtol=1e-6, atol=1e-6, err_msg=f'{i:02d}.wav {key}')
  again = embed.embed_paths(embedder, data, str(out), show_progress=False, trunk=True)
  assert not again['written'] and len(again['existing']) == len(seconds)
  # Without the trunk again: the folder is made to hold one set of representations, not a mix.
  without = embed.embed_paths(embedder, data, str(out), show_progress=False)
  assert len(without['reembedded']) == len(seconds) and 'trunk' not in np.load(out / '00.wav.npz').files


def with_step(workdir, target, new_step):
  """A copy of `workdir` whose latest checkpoint is also saved as step `new_step` (the same weights)."""
  shutil.copytree(workdir, target, ignore=shutil.ignore_patterns('tensorboard', 'eval_*'))
  steps = sorted(int(s) for s in os.listdir(target / 'checkpoints') if s.isdigit())
  shutil.copytree(target / 'checkpoints' / str(steps[-1]), target / 'checkpoints' / str(new_step))
  return steps[-1]


def test_rerun_with_another_step_or_hop_embeds_again(tiny_workdir, tmp_path):
  workdir = tmp_path / 'w'
  latest = with_step(tiny_workdir, workdir, 1)
  write_clips(tmp_path / 'in', [1.0, 2.0])
  data, out = str(tmp_path / 'in'), tmp_path / 'out'
  first = embed.run(str(workdir), data, str(out), step=latest)
  assert len(first['written']) == 2 and not first['reembedded']
  recorded = np.load(out / '00.wav.npz')
  assert str(recorded['workdir']) == str(workdir) and int(recorded['checkpoint_step']) == latest
  assert float(recorded['hop_seconds']) == pytest.approx(0.5)  # the default: the tile length
  assert float(recorded['tile_seconds']) == pytest.approx(0.5, abs=0.02)
  assert recorded['representations'].tolist() == ['embedding']
  written_at = os.stat(out / '00.wav.npz').st_mtime_ns
  same = embed.run(str(workdir), data, str(out), step=latest)
  assert len(same['existing']) == 2 and not same['written']
  assert os.stat(out / '00.wav.npz').st_mtime_ns == written_at
  other_step = embed.run(str(workdir), data, str(out), step=1)
  assert len(other_step['reembedded']) == 2 and int(np.load(out / '00.wav.npz')['checkpoint_step']) == 1
  other_hop = embed.run(str(workdir), data, str(out), step=1, hop_seconds=0.25)
  assert len(other_hop['reembedded']) == 2 and float(np.load(out / '01.wav.npz')['hop_seconds']) == 0.25
  summary = json.load(open(out / 'embed_summary.json'))
  assert len(summary['reembedded']) == 2 and summary['settings']['hop_seconds'] == 0.25


def test_settings_name_the_workdir_and_representations(embedder):
  settings = embed.output_settings(embedder)
  assert embed.same_settings(settings, embed.output_settings(embedder))
  assert not embed.same_settings(settings, embed.output_settings(embedder, trunk=True))
  assert not embed.same_settings({**settings, 'workdir': '/elsewhere'}, settings)
  assert not embed.same_settings(None, settings)


def test_bad_hop_is_refused_naming_the_flag(tmp_path):
  (tmp_path / 'a.wav').write_bytes(b'')
  for hop in (0.0, -0.5, float('nan'), float('inf')):
    with pytest.raises(EmbedError, match=f'--hop_seconds={hop}; give a positive number'):
      embed.run(str(tmp_path), str(tmp_path / 'a.wav'), str(tmp_path / 'o'), hop_seconds=hop)
    with pytest.raises(EmbedError, match=f'hop_seconds={hop}; give a positive number'):
      embed.Embedder(str(tmp_path), hop_seconds=hop)


def test_constructing_an_embedder_logs_nothing(tiny_workdir, caplog):
  from absl import logging as absl_logging
  from dem_jax import checkpoint as checkpoint_lib
  caplog.set_level(logging.INFO)
  caplog.set_level(logging.INFO, logger='absl')
  checkpoint_lib.Checkpointer(tiny_workdir, read_only=True)
  assert any('read only' in r.getMessage() for r in caplog.records)  # what orbax says, seen by this capture
  caplog.clear()
  embed.Embedder(tiny_workdir)
  from_libraries = [r for r in caplog.records if r.name == 'absl' or '/orbax/' in r.pathname]
  assert not from_libraries, [r.getMessage() for r in from_libraries]
  caplog.clear()
  absl_logging.info('the user\'s own line')  # not muted afterwards
  assert [r.getMessage() for r in caplog.records] == ["the user's own line"]


def test_output_folder_that_is_a_file_or_unwritable_is_named(tmp_path):
  blocker = tmp_path / 'out'
  blocker.write_text('')
  with pytest.raises(EmbedError, match='--output_dir=.*is a file'):
    embed.prepare_output_dir(str(blocker))
  if os.geteuid() != 0:  # root writes anywhere
    locked = tmp_path / 'locked'
    locked.mkdir(mode=0o500)
    with pytest.raises(EmbedError, match='cannot write to --output_dir'):
      embed.prepare_output_dir(str(locked / 'deeper'))


def run_embed(*flags):
  return subprocess.run([sys.executable, '-m', 'dem_jax', 'embed', *flags], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)


def test_help_lists_each_commands_flags():
  # The flags live in dem_jax.commands.*, while the dispatcher starts the process: --help must list them.
  expected = {'embed': ['--workdir', '--input', '--[no]trunk', '--batch_size', '--hop_seconds'],
              'evaluate': ['--workdir', '--features_dir', '--retrieval_k'],
              'train': ['--config', '--workdir', '--[no]distributed']}
  for command, names in expected.items():
    result = subprocess.run([sys.executable, '-m', 'dem_jax', command, '--help'], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    listed = {line.split(':')[0].strip() for line in result.stdout.splitlines() if line.startswith('  --')}
    assert set(names) <= listed, (command, sorted(listed), result.stderr[-2000:])


def test_command_line_ends_bad_input_with_one_line(tmp_path):
  audio = tmp_path / 'a.wav'
  soundfile.write(audio, sound(1.0), SR)
  (tmp_path / 'file').write_text('')
  cases = {
      'not a training workdir': ['--workdir', str(tmp_path), '--input', str(audio), '--output_dir', str(tmp_path / 'o')],
      'does not exist': ['--workdir', str(tmp_path), '--input', str(tmp_path / 'missing'),
                         '--output_dir', str(tmp_path / 'o')],
      'is a file': ['--workdir', str(tmp_path), '--input', str(audio), '--output_dir', str(tmp_path / 'file')],
      '--batch_size=0': ['--workdir', str(tmp_path), '--input', str(audio), '--output_dir', str(tmp_path / 'o'),
                         '--batch_size', '0'],
      '--hop_seconds=0.0': ['--workdir', str(tmp_path), '--input', str(audio), '--output_dir', str(tmp_path / 'o'),
                            '--hop_seconds', '0'],
  }
  for expected, flags in cases.items():
    result = run_embed(*[f'{flags[i]}={flags[i + 1]}' for i in range(0, len(flags), 2)])
    assert result.returncode == 1, (expected, result.stderr)
    assert 'Traceback' not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('embed: ') and expected in last, (expected, result.stderr)


def test_features_of_another_front_end_are_refused_naming_both_settings(embedder):
  import types
  from dem_jax.frontend import FrontEnd
  same = types.SimpleNamespace(frontend=embedder.frontend, root='/data/feats')
  embed.check_frontend(same, embedder)
  for other, named in ((FrontEnd(n_mels=64), 'n_mels=64 in the features, 32 for the model'),
                       (FrontEnd(n_mels=32, fmin=0.0), 'fmin=0.0 in the features, 50.0 for the model')):
    with pytest.raises(EmbedError, match=named):
      embed.check_frontend(types.SimpleNamespace(frontend=other, root='/data/feats'), embedder)


def test_a_failed_write_names_its_file_and_leaves_no_output_and_killed_runs_leave_nothing_behind(embedder, tmp_path,
                                                                                                monkeypatch):
  data = tmp_path / 'in'
  data.mkdir()
  soundfile.write(data / 'x.wav', sound(1.5, seed=2), SR)
  out = tmp_path / 'out'
  out.mkdir()
  stale = out / f'x.wav.npz{embed.PARTIAL_MARK}999999999'  # what a run killed while writing left
  stale.write_bytes(b'half')
  real_savez = np.savez

  def full_disk(f, **arrays):
    real_savez(f, **arrays)
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(embed.np, 'savez', full_disk)
  with pytest.raises(OSError) as raised:
    embed.embed_paths(embedder, str(data), str(out), show_progress=False)
  assert raised.value.errno == 28 and raised.value.filename == str(out / 'x.wav.npz')
  assert os.listdir(out) == []  # neither a partial file nor the stale one
  monkeypatch.setattr(embed.np, 'savez', real_savez)
  kept = out / 'take.partial-2.wav.npz'  # an output whose name merely holds the mark
  kept.write_bytes(b'x')
  assert len(embed.embed_paths(embedder, str(data), str(out), show_progress=False)['written']) == 1
  assert sorted(os.listdir(out)) == ['take.partial-2.wav.npz', 'x.wav.npz']
  assert oct((out / 'x.wav.npz').stat().st_mode & 0o777) == oct(0o644 & ~current_umask())


def current_umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_a_file_that_fails_to_re_embed_leaves_no_output_of_other_settings(embedder, tmp_path):
  data = tmp_path / 'in'
  data.mkdir()
  soundfile.write(data / 'x.wav', sound(1.5, seed=2), SR)
  out = tmp_path / 'out'
  embed.embed_paths(embedder, str(data), str(out), show_progress=False)
  (data / 'x.wav').write_bytes(b'not audio any more')
  summary = embed.embed_paths(embedder, str(data), str(out), show_progress=False, trunk=True)  # other settings
  (failure,) = summary['failures']
  assert failure['reason'].endswith('its older output, made with other settings, was removed')
  assert not (out / 'x.wav.npz').exists()
