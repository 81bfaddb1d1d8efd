"""Plots are written as PNGs of the figure's size (figsize x dpi), whatever the labels, name what they show, and the
evaluation notebook shows them inline."""

import os
import re
import struct

import numpy as np
import pytest
import threadpoolctl

from dem_jax import plots

NAMES = ['absence', 'cooking', 'dishwashing', 'vacuum_cleaner']


def png_size(path):
  with open(path, 'rb') as f:
    header = f.read(24)
  assert header[:8] == b'\x89PNG\r\n\x1a\n', f'{path} is not a PNG'
  return struct.unpack('>II', header[16:24])  # IHDR: width, height


def blobs(n_per_class=15, dim=12, seed=0):
  rng = np.random.default_rng(seed)
  y = np.repeat(np.arange(len(NAMES)), n_per_class)
  return 5.0 * rng.standard_normal((len(NAMES), dim))[y] + rng.standard_normal((len(y), dim)), y


@pytest.mark.parametrize('method', ['pca', 'tsne'])
def test_embedding_map_is_a_png_of_the_figure_size(tmp_path, method):
  x, y = blobs()
  # One thread: on a busy 2-core box, t-SNE's OpenMP barriers beside BLAS threads can cost seconds.
  with threadpoolctl.threadpool_limits(1):
    fig = plots.plot_embedding_map(x, y, NAMES, str(tmp_path / 'maps' / f'{method}.png'), method=method,
                                   representation='model embedding', title='fold 1', max_points=40)
  # The parent folder is created; the figure comes back for a notebook, of the PNG's size.
  assert png_size(tmp_path / 'maps' / f'{method}.png') == (9 * plots.DPI, int(6.5 * plots.DPI))
  assert tuple(fig.get_size_inches() * fig.dpi) == (9 * plots.DPI, 6.5 * plots.DPI)
  assert fig.axes[0].get_xlabel().startswith('t-SNE 1' if method == 'tsne' else 'PC 1')


def test_embedding_map_rejects_an_unknown_method(tmp_path):
  x, y = blobs()
  with pytest.raises(ValueError, match='method'):
    plots.plot_embedding_map(x, y, NAMES, str(tmp_path / 'm.png'), method='umap', representation='embedding')


def test_confusion_matrix_png_grows_with_the_number_of_classes(tmp_path):
  small = str(tmp_path / 'cm4.png')
  plots.plot_confusion_matrix(np.eye(4) * 3, NAMES, small)
  names = [f'class_{i}' for i in range(12)]
  cm = np.random.default_rng(0).integers(0, 9, (12, 12))
  cm[5] = 0  # a class with no test clips must not break the row normalisation
  large = str(tmp_path / 'cm12.png')
  plots.plot_confusion_matrix(cm, names, large, normalize=True)
  assert png_size(small) == (900, 720)
  assert png_size(large) == (int(13.5 * plots.DPI), 12 * plots.DPI)


def test_cluster_composition_png_and_shape_check(tmp_path):
  composition = [[10, 0, 0, 2], [0, 8, 1, 0], [0, 0, 9, 9]]
  path = str(tmp_path / 'comp.png')
  plots.plot_cluster_composition(composition, NAMES, path, representation='model embedding', space='cosine',
                                 title='fold 1')
  assert png_size(path) == (960, 720)
  with pytest.raises(ValueError, match='composition'):
    plots.plot_cluster_composition(composition, NAMES[:3], str(tmp_path / 'bad.png'), representation='embedding',
                                   space='cosine')


def test_plotting_leaves_no_pyplot_figure_open(tmp_path):
  from matplotlib import pyplot
  x, y = blobs()
  plots.plot_embedding_map(x, y, NAMES, str(tmp_path / 'm.png'), method='pca', representation='embedding')
  plots.plot_confusion_matrix(np.eye(4), NAMES, str(tmp_path / 'cm.png'))
  assert pyplot.get_fignums() == []  # a notebook looping over folds would otherwise pile them up


def test_without_a_path_a_figure_comes_back_and_nothing_is_written(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  fig = plots.plot_confusion_matrix(np.array([[3, 1], [0, 4]]), NAMES[:2], title='probe')
  assert fig.axes[0].get_title() == 'probe'
  cells = sorted(t.get_text() for t in fig.axes[0].texts)
  assert cells == ['0.00', '0.25', '0.75', '1.00']
  assert list(tmp_path.iterdir()) == []


def test_map_and_clusters_name_the_representation_and_the_k_means_space():
  x, y = blobs()
  title = plots.plot_embedding_map(x, y, NAMES, method='pca', representation='model trunk features',
                                   title='step 600').axes[0].get_title()
  assert title == 'step 600\nPCA of the model trunk features, 60 points'
  composition = [[10, 0, 0, 2], [0, 8, 1, 0]]
  clusters = plots.plot_cluster_composition(composition, NAMES, representation='model embedding', space='cosine')
  assert clusters.axes[0].get_title() == 'k-Means clusters of the model embedding (cosine: rows on the unit sphere)'
  clusters = plots.plot_cluster_composition(composition, NAMES, representation='log-Mel stats',
                                            space='standardised', title='fold2')
  assert clusters.axes[0].get_title() == 'fold2\nk-Means clusters of the log-Mel stats (standardised features)'


def test_notebook_shows_its_figures_inline_writes_to_its_output_dir_and_scores_every_fold(
    tiny_workdir, dcase_features, tmp_path, monkeypatch):
  import nbclient  # pylint: disable=import-outside-toplevel
  import nbformat  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  nb = nbformat.read(os.path.join(root, 'notebooks', 'evaluate.ipynb'), as_version=4)
  monkeypatch.setenv('DEM_JAX_WORKDIR', tiny_workdir)
  monkeypatch.setenv('DEM_JAX_FEATURES', dcase_features)
  monkeypatch.delenv('DEM_JAX_NOTEBOOK_OUT', raising=False)
  monkeypatch.setenv('TMPDIR', str(tmp_path))  # the default OUTPUT_DIR: a new folder in it
  workdir_before = sorted(os.listdir(tiny_workdir))
  nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': os.path.join(root, 'notebooks')}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  assert sum('image/png' in o.get('data', {}) for o in outputs) == 3  # the figures, not '<Figure size ...>'
  text = '\n'.join(o.get('text', '') for o in outputs)
  assert '<Figure size' not in text
  assert 'macro_f1_clip' in text and 'P@5' in text
  assert 'fold1 trunk' in text and 'cosine' in text  # the trunk probed, k-Means on the unit sphere
  assert sorted(os.listdir(tiny_workdir)) == workdir_before
  (output_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith('dem_jax_notebook_')]
  assert {'map.png', 'confusion.png', 'clusters.png', 'example.wav'} <= set(os.listdir(output_dir))
  assert all((output_dir / f).stat().st_size > 10_000 for f in ('map.png', 'confusion.png', 'clusters.png'))
  # Retrieval over every fold's test tiles finds same-class tiles of other sessions; within fold 1's test part,
  # which holds one session per class here, it would find none (P@5 = 0).
  assert float(re.search(r'P@5 = ([0-9.]+)', text).group(1)) > 0
