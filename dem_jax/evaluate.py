r"""Judge a learnt embedding space: linear probe, k-Means, retrieval, beside two no-learning baselines.

    ./launch.sh evaluate --workdir=/scratch/dcase_run [--features_dir=F] [--output_dir=O] [--step=N]

Writes O/report.json, O/report.md and PNG plots (default O: WORKDIR/eval_<step>); the same figures go into the
workdir's TensorBoard as images at the checkpoint's step, beside an embedding-projector export of the labelled
held-out tiles. Progress (embedding, each probe, k-Means, t-SNE) shows as a bar on a terminal and as a log line every
30 s otherwise. The features must come from the front end the model was trained with. The protocol follows the data:
- DCASE 2018 task 5 development set: the 4 folds (probe trained on the fold's train part, scored on its evaluate
  clips), reported as the fold mean and standard deviation with each fold listed. macro_f1_clip is the official
  per-10-s-clip metric (the mean of a clip's tile probabilities); macro_f1_tile is per 5-s tile.
- Folder data: the recorded train/test split.
k-Means and retrieval run on the labelled tiles of the test part(s), retrieval excluding the query's own clip and
group (session, song). Baselines, on the same tiles and split: per-band mean and std of the log-Mel tile, and the
same network with random weights.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from dem_jax import log_util
from dem_jax import probes
from dem_jax import report_markdown
from dem_jax.embed import Embedder, TileEmbedder, check_frontend, embed_clips, prepare_output_dir
from dem_jax.features import Features, open_features
from dem_jax.metric_writer import MetricWriter

MODEL = 'model'
BASELINES = ('logmel_stats', 'random_init')
PROJECTOR_MAX_TILES = 5000  # The projector stays responsive with a few thousand points.


def random_init_embedder(embedder: Embedder, seed: int = 0) -> TileEmbedder:
  """The trained model's architecture with freshly initialised weights (same normaliser)."""
  dummy = np.zeros((1, embedder.tile_frames, embedder.frontend.n_mels), np.float32)
  variables = embedder.model.init(jax.random.key(seed), dummy, train=False)
  return TileEmbedder(embedder.model, dict(variables), batch_size=embedder.embed_tiles.batch_size)


def probe_splits(features: Features) -> list[tuple[str, list[str], list[str]]]:
  """(name, train splits, test splits) of each evaluation: the 4 DCASE folds, or the recorded split."""
  folds = features.folds()
  if folds:
    return [(f'fold{k}', features.train_splits(k), features.test_splits(k)) for k in folds]
  train, test = features.train_splits(), features.test_splits()
  if not test or test == train:
    raise ValueError(f'{features.root} has no test part to score a probe on (splits: '
                     f'{sorted({c.split for c in features.clips})}); preprocess folder data with a test fraction or '
                     'a split file, or evaluate on a DCASE development set.')
  return [('split', train, test)]


def figures(x: np.ndarray, labels: np.ndarray, clip_ids: np.ndarray, groups: np.ndarray, splits: np.ndarray,
            protocol, label_names: list[str], *, retrieval_k: int, seed: int, on_progress=None) -> dict:
  """Every figure of one embedding (a FIG of report.json). `on_progress(note)` follows each probe and k-Means."""
  on_progress = on_progress or (lambda note: None)
  per_fold = []
  for fold_name, train_splits, test_splits in protocol:
    train, test = np.isin(splits, train_splits), np.isin(splits, test_splits)
    per_fold.append(probes.linear_probe(x[train], labels[train], x[test], labels[test], test_clip_ids=clip_ids[test],
                                        label_names=label_names, seed=seed))
    on_progress(f'linear probe, {fold_name}')
  fig = {}
  if len(per_fold) > 1:
    probe = probes.fold_summary(per_fold)
    # Per-class F1 holds class names only; their spread across folds goes beside it.
    per_class = probe['per_class_f1']
    probe['per_class_f1'] = {k: v for k, v in per_class.items() if k in label_names}
    probe['per_class_f1_std'] = {k: per_class[f'{k}_std'] for k in label_names if f'{k}_std' in per_class}
    fig['folds'] = [{'fold': name, 'linear_probe': p} for (name, _, _), p in zip(protocol, probe.pop('folds'))]
  else:
    probe = per_fold[0]
  tested = np.isin(splits, [s for _, _, test in protocol for s in test])
  kmeans = probes.kmeans_scores(x[tested], labels[tested], seed=seed, label_names=label_names)
  on_progress('k-Means')
  retrieval = probes.retrieval_precision(x[tested], labels[tested], k=retrieval_k, clip_ids=clip_ids[tested],
                                         groups=groups[tested])
  return {'linear_probe': probe, 'kmeans': kmeans, 'retrieval': retrieval} | fig


def evaluate(workdir: str, *, features_dir: str | None = None, output_dir: str | None = None, step: int | None = None,
             retrieval_k: int = 5, seed: int = 0, plot: bool = True, tensorboard: bool = True) -> dict:
  """Embeds, probes, clusters and retrieves for the model and the baselines; writes the report; returns it.

  With `plot`, the figures go to PNGs beside the report and, with `tensorboard`, into WORKDIR/tensorboard at the
  checkpoint's step (with a projector export of the labelled held-out tiles).
  """
  if plot:
    try:
      from dem_jax import plots
    except ImportError as e:
      raise ValueError(f'the figures need matplotlib ({e}); pip install dem_jax[plots], or evaluate with '
                       '--noplot.') from None
  embedder = Embedder(workdir, step=step)
  features_dir = features_dir or embedder.info.get('features_dir')
  if not features_dir:
    raise ValueError('Name the features to evaluate on with --features_dir.')
  features = open_features(features_dir)
  check_frontend(features, embedder)
  output_dir = output_dir or os.path.join(embedder.workdir, f'eval_{embedder.step}')
  prepare_output_dir(output_dir)

  protocol = probe_splits(features)
  used = {s for _, train, test in protocol for s in train + test}
  clips = [c for c in features.clips if c.label and c.split in used]
  if not clips:
    raise ValueError(f'{features.root} has no labelled clips in the splits {sorted(used)}; nothing to evaluate.')
  progress = log_util.Progress('evaluate: embedding', len(clips), unit='clip')
  table = embed_clips(features, clips, {
      MODEL: embedder.embed_tiles,
      'logmel_stats': probes.logmel_stats_embedding,
      'random_init': random_init_embedder(embedder, seed),
  }, tile_frames=embedder.tile_frames, hop_frames=embedder.hop_frames, on_progress=progress.update)
  progress.close()
  index = table['clip_index']
  labels = np.array([features.label_index(c.label) for c in clips])[index]
  clip_ids = np.array([c.clip_id for c in clips])[index]
  groups = np.array([c.group for c in clips])[index]
  splits = np.array([c.split for c in clips])[index]

  names = (MODEL,) + BASELINES
  progress = log_util.Progress('evaluate: probes and clusters', len(names) * (len(protocol) + 1) + int(plot),
                               unit='step')
  results = {name: figures(table[name], labels, clip_ids, groups, splits, protocol, features.labels,
                           retrieval_k=retrieval_k, seed=seed,
                           on_progress=lambda note, name=name: progress.update(note=f'{name}: {note}'))
             for name in names}
  report = {
      'model': results[MODEL],
      'baselines': {name: results[name] for name in BASELINES},
      'checkpoint_step': int(embedder.step),
      'settings': {
          'workdir': embedder.workdir,
          'features_dir': features.root,
          'dataset': features.dataset,
          'protocol': [{'name': n, 'train': tr, 'test': te} for n, tr, te in protocol],
          'tile_seconds': embedder.info.get('tile_seconds'),
          'tile_frames': embedder.tile_frames,
          'hop_seconds': embedder.hop_seconds,
          'num_clips': len(clips),
          'num_tiles': int(len(index)),
          'retrieval_k': retrieval_k,
          'seed': seed,
          'training_fold': embedder.info.get('fold'),
      },
  }
  plot_paths = {}
  if plot:
    tested = np.isin(splits, [s for _, _, test in protocol for s in test])
    plot_paths = {name: os.path.join(output_dir, f'{name}.png')
                  for name in ('embedding_map', 'confusion_matrix', 'cluster_composition')}
    cm = np.asarray(report['model']['linear_probe']['confusion_matrix'])
    figures_by_name = {
        'embedding_map': plots.plot_embedding_map(
            table[MODEL][tested], labels[tested], features.labels, plot_paths['embedding_map'],
            title=f'Embedding space (t-SNE), step {embedder.step}', seed=seed),
        'confusion_matrix': plots.plot_confusion_matrix(
            cm, features.labels, plot_paths['confusion_matrix'],
            title='Linear probe, per clip' + (' (mean over folds)' if len(protocol) > 1 else '')),
        'cluster_composition': plots.plot_cluster_composition(
            report['model']['kmeans']['composition'], features.labels, plot_paths['cluster_composition']),
    }
    progress.update(note='t-SNE map and figures')
    if tensorboard:
      write_tensorboard(embedder.workdir, embedder.step, figures_by_name, table[MODEL][tested],
                        [features.labels[i] for i in labels[tested]], seed=seed)
  progress.close()
  report['plots'] = {k: os.path.basename(v) for k, v in plot_paths.items()}
  with open(os.path.join(output_dir, 'report.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(output_dir, 'report.md'), 'w', encoding='utf-8') as f:
    f.write(report_markdown.render_report_markdown(report, plot_paths, relative_to=output_dir))
  report['output_dir'] = os.path.abspath(output_dir)
  return report


def write_tensorboard(workdir: str, step: int, figures_by_name: dict, embeddings: np.ndarray, labels: list[str], *,
                      seed: int) -> None:
  """The figures as images and the held-out tiles as a projector export, in WORKDIR/tensorboard at `step`.

  metrics.jsonl is left alone: a training may be appending to it.
  """
  writer = MetricWriter(workdir, jsonl=False)
  writer.write_figures(step, {f'eval/{name}': figure for name, figure in figures_by_name.items()})
  keep = np.arange(len(embeddings))
  if len(keep) > PROJECTOR_MAX_TILES:
    keep = np.sort(np.random.default_rng(seed).choice(len(keep), PROJECTOR_MAX_TILES, replace=False))
  writer.write_embedding(step, embeddings[keep], [labels[i] for i in keep], tag='eval/held_out_tiles')
  writer.close()


if __name__ == '__main__':
  # The command line, its flags and main live in dem_jax.commands.evaluate, so that importing this library module
  # defines no flags.
  from absl import app
  from dem_jax.commands import evaluate as command
  app.run(command.main)
