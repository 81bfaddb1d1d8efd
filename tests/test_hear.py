"""dem_jax.hear against the HEAR 2021 API's rules (the checks hear-validator makes), on a tiny random network.

hear-validator and torch are not in the test install (torch alone is several GB here), so the validator's checks are
written out: types, shapes and dtypes, sizes as declared, timestamps in ms at a regular hop of at most 50 ms, batch
consistency, sounds of any length; and beside them what a timestamp embedding means (where it sits, what it sees).
The torch wrapper's own tests run where torch is installed.
"""

import importlib.util
import inspect

import jax
import ml_collections
import numpy as np
import pytest

from dem_jax import hear
from dem_jax import models
from dem_jax.embed import EmbedError, Embedder
from dem_jax.frontend import FrontEnd

SR = 16000


def random_embedder(embedding_dim=16, head_hidden=0):
  """A tiny ResNet18 with random weights on 1-s tiles of 32 mel bands.

  The weights are drawn in numpy on the shapes `init` would give (jax.eval_shape): compiling `init` costs more
  than the tests themselves.
  """
  frontend = FrontEnd(n_mels=32)
  tile_frames = frontend.frames_for_seconds(1.0)
  network = models.create_model(ml_collections.ConfigDict({'name': 'resnet18', 'width': 0.125,
                                                           'embedding_dim': embedding_dim,
                                                           'head_hidden': head_hidden}))
  shapes = jax.eval_shape(network.init, jax.random.key(0), np.zeros((1, tile_frames, 32), np.float32))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'var' in name or 'scale' in name:
      return np.ones(leaf.shape, np.float32)
    if 'mean' in name or 'bias' in name:
      return np.zeros(leaf.shape, np.float32)
    fan_in = np.prod(leaf.shape[:-1])
    return (rng.standard_normal(leaf.shape) * np.sqrt(2 / fan_in)).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  return Embedder.from_model(network, dict(variables), frontend=frontend, tile_frames=tile_frames, batch_size=8,
                             hop_frames=int(frontend.frame_rate))  # tiles on a 1-s grid


@pytest.fixture(scope='module')
def model():
  """The tiny random network with 0.5-s timestamp windows."""
  return hear.HearModel(random_embedder(), timestamp_window_seconds=0.5)


def noise(n, seconds, seed=0):
  return (0.1 * np.random.default_rng(seed).standard_normal((n, int(seconds * SR)))).astype(np.float32)


def test_model_declares_integer_sizes_and_the_sample_rate(model):
  assert model.sample_rate == SR
  assert isinstance(model.scene_embedding_size, int) and isinstance(model.timestamp_embedding_size, int)
  assert model.scene_embedding_size == model.timestamp_embedding_size == 16


@pytest.mark.parametrize('seconds', [0.01, 0.2, 2.5])  # shorter than a frame, than a tile, several tiles
def test_scene_embeddings_of_any_length(model, seconds):
  audio = noise(3, seconds)
  scene = hear.get_scene_embeddings(audio, model)
  assert scene.shape == (3, model.scene_embedding_size) and scene.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(scene, axis=1), 1.0, rtol=1e-5)
  assert not np.allclose(scene[0], scene[1])  # different sounds, different embeddings


def test_scene_embedding_is_the_embedders_clip_embedding(model):
  audio = noise(2, 2.5, seed=3)
  scene = hear.get_scene_embeddings(audio, model)
  for row, sound in zip(scene, audio):
    np.testing.assert_allclose(row, model.embedder.embed_audio(sound, SR)['clip_embedding'], atol=1e-5)


@pytest.mark.parametrize('seconds', [0.01, 0.7, 3.0])
def test_timestamps_are_regular_in_ms_and_cover_the_sound(model, seconds):
  embeddings, timestamps = hear.get_timestamp_embeddings(noise(2, seconds), model)
  n, t, e = embeddings.shape
  assert (n, e) == (2, model.timestamp_embedding_size) and timestamps.shape == (2, t)
  assert embeddings.dtype == np.float32 and timestamps.dtype == np.float32
  np.testing.assert_array_equal(timestamps[0], timestamps[1])
  hops = np.diff(timestamps[0])
  if t > 1:
    np.testing.assert_allclose(hops, hops[0])
    assert 0 < hops[0] <= 50
  assert 0 <= timestamps[0, 0] < 50
  assert timestamps[0, -1] >= 1000 * seconds - 50  # in ms, up to the end of the sound
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, rtol=1e-5)


def test_timestamp_embeddings_pass_through_an_mlp_head():
  """With `model.head_hidden`, timestamp embeddings go through the hidden layer too: flipping its kernel's sign
  (which a ReLU does not undo) changes them, and they stay unit vectors of the declared size."""
  embedder = random_embedder(head_hidden=8)
  audio = noise(1, 1.5, seed=8)
  first, _ = hear.get_timestamp_embeddings(audio, hear.HearModel(embedder, timestamp_window_seconds=0.5))
  assert first.shape[-1] == 16
  np.testing.assert_allclose(np.linalg.norm(first, axis=-1), 1.0, atol=1e-5)
  variables = embedder.embed_tiles.variables
  params = dict(variables['params'])
  params['head_hidden'] = {**params['head_hidden'], 'kernel': -params['head_hidden']['kernel']}
  flipped = Embedder.from_model(embedder.model, {**variables, 'params': params}, frontend=embedder.frontend,
                                tile_frames=embedder.tile_frames, batch_size=8, hop_frames=embedder.hop_frames)
  second, _ = hear.get_timestamp_embeddings(audio, hear.HearModel(flipped, timestamp_window_seconds=0.5))
  assert np.abs(first - second).max() > 1e-2


def test_embeddings_do_not_depend_on_the_rest_of_the_batch(model):
  audio = noise(3, 2.0, seed=4)
  alone_scene = hear.get_scene_embeddings(audio[1:2], model)
  alone_emb, alone_ts = hear.get_timestamp_embeddings(audio[1:2], model)
  batch_emb, batch_ts = hear.get_timestamp_embeddings(audio, model)
  np.testing.assert_allclose(hear.get_scene_embeddings(audio, model)[1:2], alone_scene, atol=1e-5)
  np.testing.assert_allclose(batch_emb[1:2], alone_emb, atol=1e-5)
  np.testing.assert_array_equal(batch_ts[1:2], alone_ts)


def test_timestamp_embedding_sits_where_the_sound_happens(model):
  """A 50-ms burst at 3 s in 6 s of silence changes the timestamp embeddings in a stretch centred on 3 s."""
  silence = np.zeros((1, 6 * SR), np.float32)
  burst = silence.copy()
  burst[0, 3 * SR:3 * SR + 800] = noise(1, 0.05, seed=5)[0] * 5
  quiet, timestamps = hear.get_timestamp_embeddings(silence, model)
  loud, _ = hear.get_timestamp_embeddings(burst, model)
  changed = np.flatnonzero(np.abs(loud - quiet).max(axis=-1)[0] > 1e-4)
  assert len(changed) > 0
  centre = (timestamps[0, changed[0]] + timestamps[0, changed[-1]]) / 2
  assert abs(centre - 3025) <= 40  # the burst's centre, within one hop


def test_early_timestamps_ignore_audio_far_later(model):
  """The same first 4 s followed by other audio, or by more of it: the first second's embeddings do not move."""
  audio = noise(1, 8.0, seed=6)
  other_ending = audio.copy()
  other_ending[:, 6 * SR:] = noise(1, 2.0, seed=7)
  base, ts = hear.get_timestamp_embeddings(audio[:, :6 * SR], model)
  longer, _ = hear.get_timestamp_embeddings(audio, model)
  changed, _ = hear.get_timestamp_embeddings(other_ending, model)
  early = ts[0] <= 1000
  np.testing.assert_allclose(longer[0, :len(ts[0])][early], base[0][early], atol=1e-4)
  np.testing.assert_allclose(changed[0, :len(ts[0])][early], base[0][early], atol=1e-4)
  assert np.abs(changed[0, -10:] - longer[0, -10:]).max() > 1e-3


def test_bad_audio_is_refused_with_the_reason(model):
  with pytest.raises(EmbedError, match=r'\[n_sounds, n_samples\]'):
    hear.get_scene_embeddings(np.zeros(SR, np.float32), model)
  audio = noise(1, 1.0)
  audio[0, 10] = np.nan
  with pytest.raises(EmbedError, match='NaN'):
    hear.get_timestamp_embeddings(audio, model)


def test_integer_pcm_is_scaled_as_soundfile_scales_it(model):
  pcm = np.round(noise(2, 1.5, seed=10) * 2 ** 15).astype(np.int16)
  np.testing.assert_allclose(hear.get_scene_embeddings(pcm, model),
                             hear.get_scene_embeddings(pcm / np.float32(2 ** 15), model), atol=1e-6)


@pytest.fixture(scope='module')
def trunk_model(model):
  """The same network and timestamp windows, giving the trunk's features."""
  return hear.HearModel(model.embedder, timestamp_window_seconds=0.5, representation='trunk')


def test_trunk_representation_declares_its_size_and_is_the_heads_input(model, trunk_model):
  assert trunk_model.scene_embedding_size == trunk_model.timestamp_embedding_size == 64  # channels at width 0.125
  audio = noise(2, 2.5, seed=9)
  scene = hear.get_scene_embeddings(audio, trunk_model)
  assert scene.shape == (2, 64) and scene.dtype == np.float32
  for row, sound in zip(scene, audio):  # the clip's trunk features as `dem-jax embed --trunk` gives them
    np.testing.assert_allclose(row, model.embedder.embed_audio(sound, SR, trunk=True)['clip_trunk'], rtol=1e-5,
                               atol=1e-5)
  trunk, trunk_timestamps = hear.get_timestamp_embeddings(audio, trunk_model)
  embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
  assert trunk.shape == embeddings.shape[:2] + (64,) and trunk.dtype == np.float32
  np.testing.assert_array_equal(trunk_timestamps, timestamps)
  # The model's head on the trunk's timestamp features, L2-normalised, gives the timestamp embeddings.
  head = model.embedder.embed_tiles.variables['params']['head']
  z = trunk @ np.asarray(head['kernel'], np.float32) + np.asarray(head['bias'], np.float32)
  np.testing.assert_allclose(z / np.linalg.norm(z, axis=-1, keepdims=True), embeddings, atol=1e-4)


def test_load_model_takes_the_path_alone_and_the_trunk_by_name(tmp_path):
  # hear-validator and the kit's runner call load_model(path) with the path alone.
  parameters = inspect.signature(hear.load_model).parameters
  assert list(parameters)[0] == 'model_file_path' and parameters['model_file_path'].default == ''
  assert all(p.kind == p.KEYWORD_ONLY for name, p in parameters.items() if name != 'model_file_path')
  assert hear.split_representation(f'{tmp_path}:trunk') == (str(tmp_path), 'trunk')
  assert hear.split_representation(f'{tmp_path}/checkpoints/20') == (f'{tmp_path}/checkpoints/20', None)
  with pytest.raises(ValueError, match="choose one of 'embedding', 'trunk'"):
    hear.load_model(str(tmp_path), representation='logits')
  with pytest.raises(ValueError, match='names two representations'):
    hear.load_model(f'{tmp_path}:trunk', representation='embedding')


def test_model_path_names_a_workdir_or_one_of_its_steps(tmp_path):
  assert hear.resolve_model_path(str(tmp_path)) == (str(tmp_path), None)
  assert hear.resolve_model_path(str(tmp_path / 'checkpoints')) == (str(tmp_path), None)
  assert hear.resolve_model_path(str(tmp_path / 'checkpoints' / '20')) == (str(tmp_path), 20)


@pytest.mark.skipif(importlib.util.find_spec('torch') is not None, reason='torch is installed')
def test_load_model_without_torch_names_the_extra(tmp_path):
  with pytest.raises(ImportError, match=r'dem_jax\[hear\]'):
    hear.load_model(str(tmp_path))


def test_load_model_gives_a_torch_module_of_the_workdir(tiny_workdir):
  torch = pytest.importorskip('torch')
  module = hear.load_model(tiny_workdir)
  assert isinstance(module, torch.nn.Module) and module.sample_rate == SR
  audio = torch.from_numpy(noise(2, 1.5))
  scene = hear.get_scene_embeddings(audio, module)
  embeddings, timestamps = hear.get_timestamp_embeddings(audio, module)
  assert isinstance(scene, torch.Tensor) and scene.shape == (2, module.scene_embedding_size)
  assert isinstance(embeddings, torch.Tensor) and embeddings.shape[:2] == timestamps.shape
  step_dir = f'{tiny_workdir}/checkpoints/{module.core.embedder.step}'
  np.testing.assert_allclose(hear.get_scene_embeddings(audio, hear.load_model(step_dir)).numpy(), scene.numpy())
  trunk = hear.load_model(f'{step_dir}:trunk')  # as the kit's command lines name it
  assert trunk.scene_embedding_size == trunk.timestamp_embedding_size != module.scene_embedding_size
  assert hear.get_scene_embeddings(audio, trunk).shape == (2, trunk.scene_embedding_size)
