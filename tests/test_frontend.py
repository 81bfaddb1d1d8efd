import subprocess
import sys

import librosa
import numpy as np
import pytest
import soundfile

from dem_jax import audio
from dem_jax import frontend
from dem_jax.frontend import FrontEnd, log_mel, mel_matrix


def librosa_log_mel(y, fe: FrontEnd):
  """The same front end written directly with librosa: librosa frames n_fft samples with the window centred in
  them, so padding (n_fft - win_length) / 2 zeros on both sides puts its frames where ours start."""
  pad = (fe.n_fft - fe.win_length) // 2
  spec = np.abs(librosa.stft(np.pad(y, (pad, pad)), n_fft=fe.n_fft, hop_length=fe.hop_length,
                             win_length=fe.win_length, window='hann', center=False))
  mel = librosa.filters.mel(sr=fe.sample_rate, n_fft=fe.n_fft, n_mels=fe.n_mels, fmin=fe.fmin, fmax=fe.fmax,
                            htk=fe.htk, norm=None)
  return np.log(mel @ spec + fe.log_offset).T


@pytest.mark.parametrize('seconds', [0.5, 5.0, 10.0])
def test_log_mel_matches_librosa(seconds):
  fe = FrontEnd()
  rng = np.random.default_rng(0)
  t = np.arange(int(seconds * fe.sample_rate)) / fe.sample_rate
  y = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)
  ours, ref = log_mel(y, fe), librosa_log_mel(y, fe)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=1e-3)


def test_five_second_tile_is_498_frames():
  fe = FrontEnd()
  assert fe.frames_for_seconds(5.0) == 498
  assert log_mel(np.zeros(5 * 16000, np.float32), fe).shape == (498, 128)
  assert log_mel(np.zeros(479, np.float32), fe).shape == (0, 128)


def test_log_mel_blocks_do_not_change_the_result():
  fe = FrontEnd()
  y = np.random.default_rng(1).standard_normal(3 * 16000).astype(np.float32)
  np.testing.assert_allclose(log_mel(y, fe, block_frames=7), log_mel(y, fe), atol=1e-5)


def test_silence_gives_log_offset():
  fe = FrontEnd()
  assert np.allclose(log_mel(np.zeros(16000, np.float32), fe), np.log(fe.log_offset))


def test_mel_matrix_is_htk_without_area_norm():
  fe = FrontEnd()
  m = mel_matrix(fe)
  assert m.shape == (513, 128)
  assert m.max() == pytest.approx(1.0, abs=0.05)  # Triangles peak near 1 when not area-normalised.
  assert np.all(m[:int(50 / 8000 * 512)] == 0)  # Nothing below fmin.


@pytest.mark.parametrize('settings', [
    {}, {'htk': False}, {'mel_norm': 'slaney'}, {'htk': False, 'mel_norm': 'slaney'},
    {'sample_rate': 22050, 'n_fft': 2048, 'win_length': 2048, 'n_mels': 64, 'fmin': 0.0, 'fmax': 11025.0},
    {'sample_rate': 44100, 'n_fft': 2048, 'n_mels': 96, 'fmin': 20.0, 'fmax': 16000.0, 'htk': False}])
def test_mel_matrix_is_librosas_to_the_bit(settings):
  fe = FrontEnd(**settings)
  expected = librosa.filters.mel(sr=fe.sample_rate, n_fft=fe.n_fft, n_mels=fe.n_mels, fmin=fe.fmin, fmax=fe.fmax,
                                 htk=fe.htk, norm='slaney' if fe.mel_norm == 'slaney' else None, dtype=np.float32)
  np.testing.assert_array_equal(mel_matrix(fe), expected.T)


@pytest.mark.parametrize('win_length', [480, 400, 1024, 7])
def test_window_is_the_periodic_hann_window_to_the_bit(win_length):
  np.testing.assert_array_equal(frontend._window(win_length),
                                librosa.filters.get_window('hann', win_length, fftbins=True).astype(np.float32))


def test_the_front_end_imports_neither_scipy_signal_nor_numba():
  # librosa's filters and effects modules import both, slow to import: every `embed` command and preprocessing
  # worker would wait for them before its first file.
  code = ('import sys, numpy as np; from dem_jax import audio, frontend; '
          'frontend.log_mel(audio.trim_silence(np.ones(16000, np.float32), 60.0), frontend.FrontEnd()); '
          'heavy = ("scipy.signal", "numba", "librosa.filters", "librosa.effects"); '
          'print(sorted(m for m in heavy if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]', out.stdout


def _trim_cases():
  rng = np.random.default_rng(7)
  sr = 16000
  t = np.arange(3 * sr) / sr
  tone = (0.5 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
  faded = tone * np.concatenate([np.linspace(0, 1, sr), np.ones(sr), np.linspace(1, 0, sr)]).astype(np.float32)
  quiet_ends = np.concatenate([1e-4 * rng.standard_normal(sr), rng.standard_normal(sr),
                               1e-5 * rng.standard_normal(700)]).astype(np.float32)
  zeros_ends = np.concatenate([np.zeros(5000), rng.standard_normal(9000) * 0.1, np.zeros(3333)]).astype(np.float32)
  return {'tone': tone, 'fades': faded, 'quiet_ends': quiet_ends, 'zero_ends': zeros_ends,
          'short': rng.standard_normal(300).astype(np.float32), 'one_sample': np.ones(1, np.float32),
          'tiny': (1e-7 * rng.standard_normal(20000)).astype(np.float32)}


@pytest.mark.parametrize('top_db', [60.0, 20.0, 80.0])
@pytest.mark.parametrize('case', list(_trim_cases()))
def test_trim_silence_cuts_where_librosa_trims(case, top_db):
  y = _trim_cases()[case]
  expected, _ = librosa.effects.trim(y, top_db=top_db, frame_length=2048, hop_length=512)
  np.testing.assert_array_equal(audio.trim_silence(y, top_db), expected)


def test_bad_settings_name_the_field():
  with pytest.raises(ValueError, match='fmax'):
    FrontEnd(sample_rate=8000, fmax=8000.0)
  with pytest.raises(ValueError, match='win_length'):
    FrontEnd(win_length=2048)
  for field, value in (('n_mels', 0), ('hop_length', -160), ('n_fft', 1024.5), ('sample_rate', True)):
    with pytest.raises(ValueError, match=f'frontend.{field}=.*whole number'):
      FrontEnd(**{field: value})
  for field in ('fmin', 'log_offset'):
    with pytest.raises(ValueError, match=f'frontend.{field}=nan'):
      FrontEnd(**{field: float('nan')})
  with pytest.raises(ValueError, match='log_offset=0'):
    FrontEnd(log_offset=0)


@pytest.mark.parametrize('channels', [1, 2, 3, 4, 6])
@pytest.mark.parametrize('fmt,subtype', [('WAV', 'PCM_16'), ('FLAC', 'PCM_16'), ('WAV', 'PCM_24'), ('WAV', 'FLOAT')])
def test_read_audio_gives_libsndfiles_floats_and_their_channel_mean(tmp_path, channels, fmt, subtype):
  # 16-bit PCM is decoded as integers and scaled in the channel mean; the samples must be exactly those of
  # libsndfile's float32 decoding averaged over the channels, for every channel count and format.
  path = str(tmp_path / f'x.{fmt.lower()}')
  rng = np.random.default_rng(channels)
  data = np.clip(rng.standard_normal((16000, channels)) * 0.3, -1, 1)
  data[:8] = [[-1.0] * channels, [1.0] * channels] * 4  # full scale both ways
  soundfile.write(path, data, 16000, format=fmt, subtype=subtype)
  reference, _ = soundfile.read(path, dtype='float32', always_2d=True)
  expected = reference @ np.full(channels, 1 / channels, np.float32) if channels > 1 else reference[:, 0]
  samples, warnings = audio.read_audio(path, 16000)
  assert samples.dtype == np.float32 and samples.flags.c_contiguous and not warnings
  np.testing.assert_array_equal(samples, expected)
  assert samples.min() < -0.5 and samples.max() > 0.5  # not silence: the scale is right
