r"""Judge a learnt embedding space: linear probe, k-Means, retrieval, beside two no-learning baselines.

    ./launch.sh evaluate --workdir=/scratch/dcase_run [--features_dir=F] [--output_dir=O] [--step=N]

Writes O/report.json, O/report.md and PNG plots (default O: WORKDIR/eval_<step>). The protocol follows the data:
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
import sys

import jax
import numpy as np

from dem_jax import cpu_ops
from dem_jax import log_util
from dem_jax import plots
from dem_jax import probes
from dem_jax import report_markdown
from dem_jax.embed import Embedder, TileEmbedder, embed_clips
from dem_jax.features import Features, open_features

MODEL = 'model'
BASELINES = ('logmel_stats', 'random_init')


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
            protocol, label_names: list[str], *, retrieval_k: int, seed: int) -> dict:
  """Every figure of one embedding (a FIG of report.json)."""
  per_fold = []
  for _, train_splits, test_splits in protocol:
    train, test = np.isin(splits, train_splits), np.isin(splits, test_splits)
    per_fold.append(probes.linear_probe(x[train], labels[train], x[test], labels[test], test_clip_ids=clip_ids[test],
                                        label_names=label_names, seed=seed))
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
  retrieval = probes.retrieval_precision(x[tested], labels[tested], k=retrieval_k, clip_ids=clip_ids[tested],
                                         groups=groups[tested])
  return {'linear_probe': probe, 'kmeans': kmeans, 'retrieval': retrieval} | fig


def evaluate(workdir: str, *, features_dir: str | None = None, output_dir: str | None = None, step: int | None = None,
             retrieval_k: int = 5, seed: int = 0, plot: bool = True) -> dict:
  """Embeds, probes, clusters and retrieves for the model and the baselines; writes the report; returns it."""
  embedder = Embedder(workdir, step=step)
  features_dir = features_dir or embedder.info.get('features_dir')
  if not features_dir:
    raise ValueError('Name the features to evaluate on with --features_dir.')
  features = open_features(features_dir)
  output_dir = output_dir or os.path.join(embedder.workdir, f'eval_{embedder.step}')
  os.makedirs(output_dir, exist_ok=True)

  protocol = probe_splits(features)
  used = {s for _, train, test in protocol for s in train + test}
  clips = [c for c in features.clips if c.label and c.split in used]
  if not clips:
    raise ValueError(f'{features.root} has no labelled clips in the splits {sorted(used)}; nothing to evaluate.')
  table = embed_clips(features, clips, {
      MODEL: embedder.embed_tiles,
      'logmel_stats': probes.logmel_stats_embedding,
      'random_init': random_init_embedder(embedder, seed),
  }, tile_frames=embedder.tile_frames, hop_frames=embedder.hop_frames)
  index = table['clip_index']
  labels = np.array([features.label_index(c.label) for c in clips])[index]
  clip_ids = np.array([c.clip_id for c in clips])[index]
  groups = np.array([c.group for c in clips])[index]
  splits = np.array([c.split for c in clips])[index]

  results = {name: figures(table[name], labels, clip_ids, groups, splits, protocol, features.labels,
                           retrieval_k=retrieval_k, seed=seed) for name in (MODEL,) + BASELINES}
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
    plot_paths['embedding_map'] = plots.plot_embedding_map(
        table[MODEL][tested], labels[tested], features.labels, os.path.join(output_dir, 'embedding_map.png'),
        title=f'Embedding space (t-SNE), step {embedder.step}', seed=seed)
    cm = np.asarray(report['model']['linear_probe']['confusion_matrix'])
    plot_paths['confusion_matrix'] = plots.plot_confusion_matrix(
        cm, features.labels, os.path.join(output_dir, 'confusion_matrix.png'),
        title='Linear probe, per clip' + (' (mean over folds)' if len(protocol) > 1 else ''))
    plot_paths['cluster_composition'] = plots.plot_cluster_composition(
        report['model']['kmeans']['composition'], features.labels,
        os.path.join(output_dir, 'cluster_composition.png'))
  report['plots'] = {k: os.path.basename(v) for k, v in plot_paths.items()}
  with open(os.path.join(output_dir, 'report.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(output_dir, 'report.md'), 'w', encoding='utf-8') as f:
    f.write(report_markdown.render_report_markdown(report, plot_paths, relative_to=output_dir))
  report['output_dir'] = os.path.abspath(output_dir)
  return report


def main(argv):
  del argv
  from absl import flags
  FLAGS = flags.FLAGS
  cpu_ops.retain_freed_memory_on_cpu()  # before the CPU backend starts its threads
  log_util.quiet_library_logs()
  try:
    report = evaluate(FLAGS.workdir, features_dir=FLAGS.features_dir, output_dir=FLAGS.output_dir, step=FLAGS.step,
                      retrieval_k=FLAGS.retrieval_k, seed=FLAGS.seed)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'evaluate: {e}')
  print(report_markdown.format_summary_table(report))
  print(f'report: {os.path.join(report["output_dir"], "report.md")}')


if __name__ == '__main__':
  from absl import app
  from absl import flags
  flags.DEFINE_string('workdir', None, 'Training workdir.', required=True)
  flags.DEFINE_string('features_dir', None, 'Features to evaluate on (default: those the model trained on).')
  flags.DEFINE_string('output_dir', None, 'Where the report goes (default: WORKDIR/eval_<step>).')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_integer('retrieval_k', 5, 'k of precision@k.')
  flags.DEFINE_integer('seed', 0, 'Seed of the probe, k-Means, t-SNE and the random-init baseline.')
  app.run(main)
