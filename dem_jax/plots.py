"""Figures of the learnt space a person wants to look at: 2-D maps, confusion matrices, cluster make-up.

Each function returns its matplotlib `Figure` (a notebook shows it; `MetricWriter.write_figures` puts it in
TensorBoard) and, given a `path`, also writes it there as a PNG (parent folders created). Figures are drawn on a bare
`Figure` with the Agg canvas rather than through pyplot, so importing this module never switches a notebook's
backend and no figure is left open (a notebook shows them inline after `%matplotlib inline`). A map and a cluster
chart name the representation they show, and the chart its k-Means space, in the title: figures of several
representations look alike.
"""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

__all__ = ['plot_embedding_map', 'plot_confusion_matrix', 'plot_cluster_composition']

DPI = 120

# How the titles name `probes.kmeans_scores`'s spaces.
KMEANS_SPACE_NAMES = {'standardised': 'standardised features', 'cosine': 'cosine: rows on the unit sphere'}


def _new_figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), dpi=DPI)
  FigureCanvasAgg(fig)
  return fig


def _finish(fig: Figure, path: str | None) -> Figure:
  fig.tight_layout()
  if path is not None:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # No bbox_inches='tight': the PNG keeps the figure's size, figsize x dpi, whatever the labels.
    fig.savefig(path, dpi=DPI, format='png')
  return fig


def _label_colors(num_labels: int) -> list:
  # Qualitative maps while they have enough distinct colours; a sampled continuous map beyond 20.
  if num_labels <= 10:
    return [matplotlib.colormaps['tab10'](i) for i in range(num_labels)]
  if num_labels <= 20:
    return [matplotlib.colormaps['tab20'](i) for i in range(num_labels)]
  return [matplotlib.colormaps['turbo'](v) for v in np.linspace(0.05, 0.95, num_labels)]


def plot_embedding_map(
    x,
    labels,
    label_names: Sequence[str],
    path: str | None = None,
    *,
    representation: str,
    method: str = 'tsne',
    title: str = 'Embedding map',
    max_points: int = 3000,
    seed: int = 0,
) -> Figure:
  """2-D map (t-SNE or PCA) of embeddings [N, D], one colour per label, on at most max_points random points.

  `representation` names what x is (e.g. 'model embedding'); the title's second line says which map of it this is.
  """
  x = np.asarray(x, dtype=np.float64)
  labels = np.asarray(labels)
  if x.ndim != 2 or labels.shape != (len(x),):
    raise ValueError(f'x must be [N, D] and labels [N]; got {x.shape} and {labels.shape}.')
  if method not in ('tsne', 'pca'):
    raise ValueError(f"method must be 'tsne' or 'pca', got {method!r}.")
  if len(x) < 3:
    raise ValueError(f'a 2-D map needs at least 3 points, got {len(x)}.')
  rng = np.random.default_rng(seed)
  if len(x) > max_points:
    keep = np.sort(rng.choice(len(x), size=max_points, replace=False))
    x, labels = x[keep], labels[keep]
  n = len(x)

  if method == 'pca':
    pca = PCA(n_components=2, random_state=seed)
    xy = pca.fit_transform(x)
    ratio = pca.explained_variance_ratio_
    axis_names = (f'PC 1 ({100 * ratio[0]:.0f}% of variance)', f'PC 2 ({100 * ratio[1]:.0f}% of variance)')
  else:
    # PCA to 50 dims first, the usual way to make t-SNE fast and less noisy on wide embeddings.
    if x.shape[1] > 50 and n > 50:
      x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, (n - 1) / 3))
    xy = TSNE(n_components=2, perplexity=perplexity, init='pca', random_state=seed).fit_transform(x)
    axis_names = ('t-SNE 1', 't-SNE 2')

  fig = _new_figure(9, 6.5)
  ax = fig.add_subplot()
  colors = _label_colors(len(label_names))
  for index, name in enumerate(label_names):
    mask = labels == index
    if mask.any():
      ax.scatter(xy[mask, 0], xy[mask, 1], s=8, alpha=0.7, color=colors[index], label=f'{name} ({mask.sum()})',
                 linewidths=0)
  ax.set_title(f'{title}\n{method.upper() if method == "pca" else "t-SNE"} of the {representation}, {n} points')
  ax.set_xlabel(axis_names[0])
  ax.set_ylabel(axis_names[1])
  ax.legend(title='label', loc='upper left', bbox_to_anchor=(1.01, 1.0), markerscale=2, fontsize='small',
            frameon=False)
  return _finish(fig, path)


def plot_confusion_matrix(
    cm,
    label_names: Sequence[str],
    path: str | None = None,
    *,
    title: str = 'Confusion matrix',
    normalize: bool = True,
) -> Figure:
  """Confusion matrix [K, K] (rows true, columns predicted) with the value in each cell.

  normalize=True divides each row by its count, so a cell reads as the share of that true class.
  """
  cm = np.asarray(cm, dtype=np.float64)
  k = len(label_names)
  if cm.shape != (k, k):
    raise ValueError(f'cm must be [{k}, {k}] for {k} label_names, got {cm.shape}.')
  if normalize:
    rows = cm.sum(axis=1, keepdims=True)
    values = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
  else:
    values = cm

  side = max(6.0, 0.75 * k + 3.0)
  fig = _new_figure(side + 1.5, side)
  ax = fig.add_subplot()
  image = ax.imshow(values, cmap='Blues', vmin=0.0, vmax=1.0 if normalize else None)
  colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  colorbar.set_label('share of the true class' if normalize else 'count')
  threshold = values.max() / 2 if values.size else 0.0
  for i in range(k):
    for j in range(k):
      text = f'{values[i, j]:.2f}' if normalize else f'{values[i, j]:.0f}'
      ax.text(j, i, text, ha='center', va='center', fontsize='small',
              color='white' if values[i, j] > threshold else 'black')
  ax.set_xticks(range(k), labels=label_names, rotation=45, ha='right', rotation_mode='anchor')
  ax.set_yticks(range(k), labels=label_names)
  ax.set_xlabel('Predicted label')
  ax.set_ylabel('True label')
  ax.set_title(title)
  return _finish(fig, path)


def plot_cluster_composition(
    composition,
    label_names: Sequence[str],
    path: str | None = None,
    *,
    representation: str,
    space: str,
    title: str | None = None,
) -> Figure:
  """Stacked bars, one per cluster, split by label; composition is [clusters, labels] counts.

  The title names the clustered `representation` (e.g. 'model embedding') and the k-Means `space` ('standardised' or
  'cosine', as `probes.kmeans_scores` returns it), below `title` (e.g. the fold) when given.
  """
  composition = np.asarray(composition, dtype=np.float64)
  if composition.ndim != 2 or composition.shape[1] != len(label_names):
    raise ValueError(f'composition must be [clusters, {len(label_names)}], got {composition.shape}.')
  num_clusters = composition.shape[0]
  fig = _new_figure(max(8.0, 0.5 * num_clusters + 4.0), 6)
  ax = fig.add_subplot()
  colors = _label_colors(len(label_names))
  bottom = np.zeros(num_clusters)
  positions = np.arange(num_clusters)
  for index, name in enumerate(label_names):
    ax.bar(positions, composition[:, index], bottom=bottom, color=colors[index], label=name, width=0.8)
    bottom += composition[:, index]
  ax.set_xticks(positions, labels=[str(c) for c in positions])
  ax.set_xlabel('cluster')
  ax.set_ylabel('tiles')
  names = f'k-Means clusters of the {representation} ({KMEANS_SPACE_NAMES.get(space, space)})'
  ax.set_title(f'{title}\n{names}' if title else names)
  ax.legend(title='label', loc='upper left', bbox_to_anchor=(1.01, 1.0), fontsize='small', frameon=False)
  return _finish(fig, path)
