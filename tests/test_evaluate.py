"""Embedding, the report command, the embed command and the notebook, on a tiny trained workdir."""

import glob
import inspect
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
from preprocess import sample_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Readers (Embedder, evaluate, embed) open checkpoints with Checkpointer(workdir, read_only=True).
needs_read_only_checkpointer = pytest.mark.skipif(
    'read_only' not in inspect.signature(checkpoint_lib.Checkpointer.__init__).parameters,
    reason='Checkpointer(workdir, read_only=True) is not in dem_jax.checkpoint yet')


def probing_env(**extra):
  """The environment without JAX_PLATFORMS, so that jax probes its backends as on a user's machine."""
  return {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'} | extra


def test_tile_starts_cover_the_clip_on_the_hop():
  assert tile_starts(998, 498, 498).tolist() == [0, 498]
  assert tile_starts(100, 498, 498).tolist() == [0]  # Shorter than a tile: one (padded) tile.
  assert tile_starts(1000, 100, 300).tolist() == [0, 300, 600, 900]


@needs_read_only_checkpointer
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


@needs_read_only_checkpointer
def test_report_command_writes_json_markdown_and_plots(tiny_workdir, dcase_features, tmp_path):
  out = tmp_path / 'report'
  result = subprocess.run([sys.executable, '-m', 'dem_jax.evaluate', f'--workdir={tiny_workdir}',
                           f'--features_dir={dcase_features}', f'--output_dir={out}'],
                          cwd=ROOT, capture_output=True, text=True, env=probing_env(JAX_NUM_CPU_DEVICES='2'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Unable to initialize backend' not in result.stderr, result.stderr[-3000:]
  assert 'log-Mel' in result.stdout and 'Random-init' in result.stdout and 'report.md' in result.stdout
  report = json.load(open(out / 'report.json'))
  assert report['checkpoint_step'] == 20
  for fig in (report['model'], report['baselines']['logmel_stats'], report['baselines']['random_init']):
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
  assert report['settings']['dataset'] == 'dcase2018_task5'
  markdown = (out / 'report.md').read_text()
  assert '## Per fold' in markdown and '_std' not in markdown
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


@needs_read_only_checkpointer
def test_embed_command_skips_an_unreadable_file(tiny_workdir, tmp_path):
  data = tmp_path / 'in'
  (data / 'sub').mkdir(parents=True)
  rng = np.random.default_rng(0)
  soundfile.write(data / 'long.wav', sample_data.activity_sound('vacuum_cleaner', rng, 3 * 16000), 16000)
  soundfile.write(data / 'sub' / 'short.flac', sample_data.activity_sound('working', rng, 2000), 16000)
  (data / 'broken.wav').write_text('not audio')
  out = tmp_path / 'out'
  result = subprocess.run([sys.executable, '-m', 'dem_jax.embed', f'--workdir={tiny_workdir}', f'--input={data}',
                           f'--output_dir={out}'], cwd=ROOT, capture_output=True, text=True, env=probing_env())
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Unable to initialize backend' not in result.stderr, result.stderr[-3000:]
  assert 'broken.wav' in result.stderr
  long = np.load(out / 'long.wav.npz')
  assert long['embeddings'].shape == (6, 32) and long['timestamps'].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
  short = np.load(out / 'sub' / 'short.flac.npz')  # 1/8 s: padded with silence to one tile.
  assert short['embeddings'].shape == (1, 32) and short['clip_embedding'].shape == (32,)
  summary = json.load(open(out / 'embed_summary.json'))
  assert [os.path.basename(f['path']) for f in summary['failures']] == ['broken.wav']


@needs_read_only_checkpointer
def test_notebook_runs_end_to_end(tiny_workdir, dcase_features, tmp_path):
  import nbclient
  import nbformat
  nb = nbformat.read(os.path.join(ROOT, 'notebooks', 'evaluate.ipynb'), as_version=4)
  env = {'DEM_JAX_WORKDIR': tiny_workdir, 'DEM_JAX_FEATURES': dcase_features, 'DEM_JAX_NOTEBOOK_OUT': str(tmp_path)}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                            resources={'metadata': {'path': os.path.join(ROOT, 'notebooks')}}).execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  outputs = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []))
  assert 'macro_f1_clip' in outputs and 'P@5' in outputs
  assert all((tmp_path / f).stat().st_size > 10_000 for f in ('map.png', 'confusion.png', 'clusters.png'))
