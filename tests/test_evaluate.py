"""Embedding, the report command, the embed command and the notebook, on a tiny trained workdir."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from dem_jax import checkpoint as checkpoint_lib
from dem_jax.embed import Embedder, tile_starts
from dem_jax.features import open_features
from dem_jax.preprocess import sample_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Readers (Embedder, evaluate, embed) open checkpoints with Checkpointer(workdir, read_only=True).

def probing_env(**extra):
  """The environment without JAX_PLATFORMS, so that jax probes its backends as on a user's machine."""
  return {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'} | extra


def test_tile_starts_cover_the_clip_on_the_hop():
  assert tile_starts(998, 498, 498).tolist() == [0, 498]
  assert tile_starts(100, 498, 498).tolist() == [0]  # Shorter than a tile: one (padded) tile.
  assert tile_starts(1000, 100, 300).tolist() == [0, 300, 600, 900]


def test_embedder_on_features_and_on_the_same_audio_file(tiny_workdir, dcase_features, dcase_dir):
  embedder = Embedder(tiny_workdir)
  features = open_features(dcase_features)
  clips = features.clips[:3]
  table = embedder.embed_features(features, clips)
  per_clip = len(tile_starts(998, embedder.tile_frames, embedder.hop_frames))
  assert embedder.hop_frames == 50  # 0.5-s tiles (48 frames) on a 0.5-s grid.
  assert table['embeddings'].shape == (3 * per_clip, 32)
  np.testing.assert_allclose(np.linalg.norm(table['embeddings'], axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(table['clip_embeddings'], axis=1), 1.0, atol=1e-5)
  assert table['clip_index'].tolist() == [i for i in range(3) for _ in range(per_clip)]
  from_file = embedder.embed_file(os.path.join(dcase_dir, clips[0].path))
  np.testing.assert_allclose(from_file['timestamps'], np.arange(per_clip) * embedder.hop_seconds, atol=1e-6)
  # The store holds float16 features; the file path computes float32 ones: the same point up to that rounding.
  cosine = np.sum(from_file['embeddings'] * table['embeddings'][:per_clip], axis=1)
  assert np.all(cosine > 0.999)


def test_the_trunk_is_the_head_input_of_the_same_pass(tiny_workdir, dcase_features):
  embedder = Embedder(tiny_workdir)
  table = embedder.embed_features(open_features(dcase_features), open_features(dcase_features).clips[:2],
                                  trunk=True)
  trunk, embeddings = table['trunk'], table['embeddings']
  head = embedder.embed_tiles.variables['params']['head']
  assert trunk.shape == (len(embeddings), head['kernel'].shape[0])
  # The model's head on these features, L2-normalised, gives the embedding of the same tiles.
  z = trunk @ np.asarray(head['kernel'], np.float32) + np.asarray(head['bias'], np.float32)
  np.testing.assert_allclose(z / np.linalg.norm(z, axis=1, keepdims=True), embeddings, atol=1e-4)
  # The trunk's own geometry: unnormalised (not on the unit sphere), unlike the embedding.
  assert np.ptp(np.linalg.norm(trunk, axis=1)) > 1e-3


def test_report_command_writes_json_markdown_and_plots(tiny_workdir, dcase_features, tmp_path):
  out = tmp_path / 'report'
  result = subprocess.run([sys.executable, '-m', 'dem_jax', 'evaluate', f'--workdir={tiny_workdir}',
                           f'--features_dir={dcase_features}', f'--output_dir={out}'],
                          cwd=ROOT, capture_output=True, text=True, env=probing_env(JAX_NUM_CPU_DEVICES='2'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Unable to initialize backend' not in result.stderr, result.stderr[-3000:]
  assert 'read only' not in result.stderr, result.stderr[-3000:]  # orbax restating the reader's own choice
  assert 'log-Mel' in result.stdout and 'Random-init' in result.stdout and 'report.md' in result.stdout
  report = json.load(open(out / 'report.json'))
  assert report['checkpoint_step'] == 20
  for fig in (report['model'], report['model_trunk'], report['baselines']['logmel_stats'],
              report['baselines']['random_init']):
    probe = fig['linear_probe']
    for key in ('macro_f1_clip', 'macro_f1_tile', 'accuracy'):
      assert 0.0 <= probe[key] <= 1.0
    folds = [f['linear_probe'] for f in fig['folds']]
    assert [f['fold'] for f in fig['folds']] == ['fold1', 'fold2', 'fold3', 'fold4']
    assert probe['macro_f1_clip'] == pytest.approx(np.mean([f['macro_f1_clip'] for f in folds]))
    assert probe['macro_f1_clip_std'] == pytest.approx(np.std([f['macro_f1_clip'] for f in folds]))
    assert set(probe['per_class_f1']) == set(open_features(dcase_features).labels)
    assert 0.0 <= fig['kmeans']['nmi'] <= 1.0 and -1.0 <= fig['kmeans']['ari'] <= 1.0
    assert 0.0 <= fig['kmeans']['purity'] <= 1.0
    assert 0.0 <= fig['retrieval']['precision_at_k'] <= 1.0 and fig['retrieval']['k'] == 5
    assert (fig['kmeans']['space'], fig['kmeans_cosine']['space']) == ('standardised', 'cosine')
  assert report['settings']['dataset'] == 'dcase2018_task5'
  assert report['settings']['protocol_name'].startswith('one embedding for all folds')
  assert report['settings']['training_fold'] == 1
  assert report['settings']['training_loss'] == 'triplet'  # the workdir's config.json
  assert set(report['representations']) == {'model', 'model_trunk', 'logmel_stats', 'random_init'}
  markdown = (out / 'report.md').read_text()
  assert '## Per fold' in markdown and '_std' not in markdown
  assert 'Model trunk (pooled, before the head)' in markdown and 'Model trunk' in result.stdout
  for name in ('embedding_map.png', 'confusion_matrix.png', 'cluster_composition.png'):
    assert (out / name).stat().st_size > 10_000 and name in markdown
  # The same figures and the labelled held-out tiles in the workdir's TensorBoard, at the checkpoint's step.
  (metadata,) = glob.glob(os.path.join(tiny_workdir, 'tensorboard', '00020', '*', 'metadata.tsv'))
  with open(metadata) as f:
    labels = f.read().split()
  assert len(labels) == report['settings']['num_tiles']  # every tile is held out in one of the 4 folds
  assert set(labels) == {c.label for c in open_features(dcase_features).clips}
  events = ''.join(open(p, 'rb').read().decode('latin-1')
                   for p in glob.glob(os.path.join(tiny_workdir, 'tensorboard', 'events.out.tfevents.*')))
  assert all(f'eval/{name}' in events for name in ('embedding_map', 'confusion_matrix', 'cluster_composition'))


def test_embed_command_skips_an_unreadable_file(tiny_workdir, tmp_path):
  data = tmp_path / 'in'
  (data / 'sub').mkdir(parents=True)
  rng = np.random.default_rng(0)
  soundfile.write(data / 'long.wav', sample_data.activity_sound('vacuum_cleaner', rng, 3 * 16000), 16000)
  soundfile.write(data / 'sub' / 'short.flac', sample_data.activity_sound('working', rng, 2000), 16000)
  (data / 'broken.wav').write_text('not audio')
  out = tmp_path / 'out'
  result = subprocess.run([sys.executable, '-m', 'dem_jax', 'embed', f'--workdir={tiny_workdir}', f'--input={data}',
                           f'--output_dir={out}'], cwd=ROOT, capture_output=True, text=True, env=probing_env())
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Unable to initialize backend' not in result.stderr, result.stderr[-3000:]
  assert 'read only' not in result.stderr, result.stderr[-3000:]  # orbax restating the reader's own choice
  assert 'broken.wav' in result.stderr
  long = np.load(out / 'long.wav.npz')
  assert long['embeddings'].shape == (6, 32) and long['timestamps'].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
  short = np.load(out / 'sub' / 'short.flac.npz')  # 1/8 s: padded with silence to one tile.
  assert short['embeddings'].shape == (1, 32) and short['clip_embedding'].shape == (32,)
  summary = json.load(open(out / 'embed_summary.json'))
  assert [os.path.basename(f['path']) for f in summary['failures']] == ['broken.wav']


def copy_workdir(workdir, target, **model_info):
  """A copy of `workdir` (its checkpoints and model.json, without its TensorBoard and reports) whose model.json
  fields are replaced by `model_info`: the same weights, presented as trained with another setting."""
  import shutil
  shutil.copytree(workdir, target, ignore=shutil.ignore_patterns('tensorboard', 'eval_*'))
  path = os.path.join(target, checkpoint_lib.MODEL_INFO)
  info = json.load(open(path)) | model_info
  with open(path, 'w') as f:
    json.dump(info, f)
  return str(target)


@pytest.fixture(scope='module')
def fold_workdirs(tiny_workdir, tmp_path_factory):
  """Four workdirs, one per fold. Training four models is costly, so they are copies of the tiny workdir (trained
  with data.fold=1) with model.json's fold changed; fold 3's copy also gets another input normaliser (band_mean
  shifted by 1), so that its embedding differs and the tests can tell which workdir embedded which fold."""
  root = tmp_path_factory.mktemp('folds')
  info = checkpoint_lib.read_model_info(tiny_workdir)
  assert info['fold'] == 1
  shifted = [m + 1.0 for m in info['band_mean']]
  return [copy_workdir(tiny_workdir, root / f'fold{k}', fold=k, **({'band_mean': shifted} if k == 3 else {}))
          for k in (1, 2, 3, 4)]


def test_per_fold_embeddings_score_each_fold_on_its_own_workdir(fold_workdirs, dcase_features, tmp_path):
  from dem_jax import evaluate
  one = evaluate.evaluate(fold_workdirs[0], features_dir=dcase_features, output_dir=str(tmp_path / 'one'),
                          plot=False)
  # Given in another order: the folds are matched by model.json's fold, not by position.
  per_fold = evaluate.evaluate(fold_workdirs[::-1], features_dir=dcase_features, output_dir=str(tmp_path / 'four'))
  assert one['settings']['protocol_name'] == evaluate.PROTOCOL_ONE_EMBEDDING
  assert per_fold['settings']['protocol_name'] == evaluate.PROTOCOL_PER_FOLD
  assert per_fold['checkpoint_step'] == {'fold1': 20, 'fold2': 20, 'fold3': 20, 'fold4': 20}
  assert per_fold['settings']['workdirs'] == {f'fold{k}': os.path.abspath(w)
                                              for k, w in zip((1, 2, 3, 4), fold_workdirs)}
  def fold_probes(report, name):
    fig = report[name] if name in report else report['baselines'][name]
    return [f['linear_probe'] for f in fig['folds']]

  for name in ('model', 'model_trunk', 'random_init'):
    one_folds, four_folds = fold_probes(one, name), fold_probes(per_fold, name)
    # Folds 1, 2 and 4 use the same weights and normaliser as the single workdir: the same probe, to the digit.
    for k in (0, 1, 3):
      assert four_folds[k] == one_folds[k], (name, k)
  # The log-Mel statistics need no model: the same in both protocols, fold by fold.
  assert fold_probes(per_fold, 'logmel_stats') == fold_probes(one, 'logmel_stats')
  # With per-fold embeddings, k-Means and retrieval run on each fold's test tiles, then are averaged over folds.
  model = per_fold['model']
  tiles_per_fold = [f['linear_probe']['num_test_tiles'] for f in model['folds']]
  assert [int(np.sum(f['kmeans']['composition'])) for f in model['folds']] == tiles_per_fold
  assert [f['kmeans_cosine']['space'] for f in model['folds']] == ['cosine'] * 4
  assert model['kmeans']['nmi'] == pytest.approx(np.mean([f['kmeans']['nmi'] for f in model['folds']]))
  assert [f['retrieval']['num_queries'] + f['retrieval']['num_skipped'] for f in model['folds']] == tiles_per_fold
  assert model['retrieval']['precision_at_k'] == pytest.approx(
      np.mean([f['retrieval']['precision_at_k'] for f in model['folds']]))
  assert 'composition' not in model['kmeans']  # cluster numbers mean nothing across folds
  # With one embedding, k-Means runs once over the test tiles of all folds.
  assert int(np.sum(one['model']['kmeans']['composition'])) == sum(tiles_per_fold)
  markdown = open(os.path.join(per_fold['output_dir'], 'report.md')).read()
  assert f'Protocol: {evaluate.PROTOCOL_PER_FOLD}.' in markdown and 'Checkpoint steps: fold1 20' in markdown
  # Each workdir's projector export holds its own fold's test tiles, embedded by that workdir: fold 3's are the
  # shifted copy's embeddings, not the single workdir's.
  features = open_features(dcase_features)
  fold3_clips = [c for c in features.clips if c.split == 'fold3']
  (exported,) = glob.glob(os.path.join(fold_workdirs[2], 'tensorboard', '00020', '*', 'tensors.tsv'))
  exported = np.loadtxt(exported, ndmin=2)
  own = Embedder(fold_workdirs[2]).embed_features(features, fold3_clips)['embeddings']
  other = Embedder(fold_workdirs[0]).embed_features(features, fold3_clips)['embeddings']
  np.testing.assert_allclose(exported, own, atol=1e-4)
  assert np.abs(exported - other).max() > 1e-2


def test_per_fold_evaluation_refuses_workdirs_that_do_not_give_one_embedding_per_fold(
    fold_workdirs, tiny_workdir, dcase_features, tmp_path):
  from dem_jax import evaluate

  def refusal(workdirs, **kwargs):
    with pytest.raises(ValueError) as raised:
      evaluate.evaluate(workdirs, features_dir=dcase_features, output_dir=str(tmp_path / 'out'), plot=False,
                        **kwargs)
    return str(raised.value)

  message = refusal(fold_workdirs[:3])
  assert 'no workdir trained with data.fold=4' in message and '--config.data.fold=$k' in message
  message = refusal(fold_workdirs[:3] + [fold_workdirs[0]])
  assert 'both trained with data.fold=1' in message and 'one workdir per fold' in message
  all_folds = copy_workdir(tiny_workdir, tmp_path / 'all_folds', fold=0)
  assert 'names no training fold' in refusal(fold_workdirs[:3] + [all_folds])
  longer_tiles = copy_workdir(fold_workdirs[3], tmp_path / 'longer', tile_frames=96)
  message = refusal(fold_workdirs[:3] + [longer_tiles])
  assert 'differ in tile_frames (48 vs 96)' in message
  other_store = copy_workdir(fold_workdirs[3], tmp_path / 'other_store', features_digest='0123456789abcdef')
  message = refusal(fold_workdirs[:3] + [other_store])
  assert 'were trained on different feature stores (features_digest:' in message and '0123456789abcdef' in message
  assert '--step=20 names one checkpoint' in refusal(fold_workdirs, step=20)
  assert not os.path.exists(tmp_path / 'out' / 'report.json')


def test_evaluate_command_takes_workdirs_comma_separated_and_refuses_a_missing_fold(fold_workdirs, dcase_features,
                                                                                  tmp_path):
  result = subprocess.run([sys.executable, '-m', 'dem_jax', 'evaluate', f'--workdir={",".join(fold_workdirs[:2])}',
                           f'--workdir={fold_workdirs[3]}', f'--features_dir={dcase_features}',
                           f'--output_dir={tmp_path}'], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith('evaluate: no workdir trained with data.fold=3 among')
  assert 'Traceback' not in result.stderr


def test_non_finite_tile_vectors_are_refused_naming_the_representation_clip_and_store():
  from dem_jax import evaluate
  good, bad = np.zeros((3, 4)), np.zeros((3, 4))
  bad[1, 2] = np.nan
  clip_ids = np.array(['a', 'b', 'c'])
  evaluate.check_finite({'model': good, 'logmel_stats': {'fold1': good}}, clip_ids, '/feats')
  with pytest.raises(ValueError, match=r"model is not finite for 1 tile\(s\), first of clip b in /feats: the "
                                       r"fold2 workdir's checkpoint"):
    evaluate.check_finite({'model': {'fold1': good, 'fold2': bad}}, clip_ids, '/feats')
  with pytest.raises(ValueError, match="logmel_stats is not finite .* clip b in /feats: the store's frames"):
    evaluate.check_finite({'logmel_stats': bad}, clip_ids, '/feats')
