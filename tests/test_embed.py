"""Embedding in-memory audio and folders of files, on a tiny random network; the embed command's bad-input lines."""

import os
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


def test_folder_outputs_keep_the_extension_and_skip_bad_files(embedder, tmp_path):
  data = tmp_path / 'in'
  (data / 'sub').mkdir(parents=True)
  soundfile.write(data / 'x.wav', sound(1.5, seed=2), SR)
  soundfile.write(data / 'x.flac', sound(2.5, seed=3), SR)
  soundfile.write(data / 'sub' / 'loud.wav', np.full(SR, 3e38, np.float32), SR, subtype='FLOAT')
  summary = embed.embed_paths(embedder, str(data), str(tmp_path / 'out'), show_progress=False)
  assert sorted(os.path.relpath(p, tmp_path / 'out') for p in summary['written']) == ['x.flac.npz', 'x.wav.npz']
  assert np.load(tmp_path / 'out' / 'x.wav.npz')['embeddings'].shape == (1, 16)
  assert np.load(tmp_path / 'out' / 'x.flac.npz')['embeddings'].shape == (2, 16)
  (failure,) = summary['failures']
  assert failure['path'].endswith('loud.wav') and 'log-Mel spectrogram holds NaN or infinite' in failure['reason']
  assert not (tmp_path / 'out' / 'sub').exists()  # nothing written for it


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
  return subprocess.run([sys.executable, '-m', 'dem_jax.embed', *flags], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)


def test_command_line_ends_bad_input_with_one_line(tmp_path):
  audio = tmp_path / 'a.wav'
  soundfile.write(audio, sound(1.0), SR)
  (tmp_path / 'file').write_text('')
  cases = {
      'not a training workdir': ['--workdir', str(tmp_path), '--input', str(audio), '--output_dir', str(tmp_path / 'o')],
      'does not exist': ['--workdir', str(tmp_path), '--input', str(tmp_path / 'missing'),
                         '--output_dir', str(tmp_path / 'o')],
      'is a file': ['--workdir', str(tmp_path), '--input', str(audio), '--output_dir', str(tmp_path / 'file')],
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
