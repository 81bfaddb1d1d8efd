r"""The quality suite: one training budget, several real-audio tasks of different kinds, and their average.

    dem-jax bench quality --suite [--minutes=15] [--config=music:cpu] [--config.X=V ...]
    dem-jax bench quality --suite --tasks=speakers,sounds --suite_minutes=10 --minutes=1   # a quick check
    dem-jax bench quality --suite --build_only --export_hear=/data/hear_tasks   # the tasks for heareval's runners

The tasks (each built once under --data_dir from Debian packages, cached, split by source so that nothing heard in
training is tested):
- instruments: instrument family of real tunes on sampled instruments (dem_jax.benchmarks.quality_data, today's
  `bench quality` set, as it is; split by tune);
- speakers: who speaks, among festival voices built from recordings of real speakers in three languages
  (dem_jax.benchmarks.quality_speech; split by passage, no sentence on both sides);
- sounds: the kind of an everyday sound effect, recorded (dem_jax.benchmarks.quality_sounds; split by source file).
--suite_minutes sets the audio per task (default 60; the instrument set has 80 at full size and is cut to fewer
tunes below 60). A task whose material cannot be installed is skipped with one line naming the packages; the
average is taken over the tasks that ran, and says which.

Each task is preprocessed, trained within --minutes and evaluated through the CLI as `bench quality` does, in
WORKDIR/<task>. Per task and representation (the model's embedding and pooled trunk, the log-Mel statistics and
random-init baselines) it prints tile and clip macro F1 of the linear probe, NMI (the median over k-Means seeds
0-9 of the standardised test tiles) and precision@5, then their average over the tasks; the last line is JSON:
{"tasks": {TASK: {REP: {tile_f1, clip_f1, nmi, p_at_5}}}, "average": {REP: {...}}, "tasks_averaged": [...],
"skipped": {TASK: why}, "datasets": {...}, "runs": {...}}. A finished task leaves its figures in WORKDIR/<task>
(quality.json), so the same command started again after a kill keeps them and goes on with the rest.

A recipe is judged over training seeds: `--seeds=0,1,2` runs the whole suite once per seed (WORKDIR/seed_N/<task>,
`--config.seed=N`), seed by seed, then prints per task and on average the mean and standard deviation over the
seeds; the JSON's "tasks" and "average" hold the means, "spread" the standard deviations (for "average": of each
seed's average over the tasks), and "runs" each seed's run per task.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from typing import Callable

from dem_jax.benchmarks import hear_export
from dem_jax.benchmarks import quality
from dem_jax.benchmarks import quality_data
from dem_jax.benchmarks import quality_sounds
from dem_jax.benchmarks import quality_speech

DEFAULT_MINUTES = 60.0
INSTRUMENT_MINUTES = 80.0  # The instrument set at full size (41 tunes).
KMEANS_SEEDS = tuple(range(10))
REPRESENTATIONS = ('model', 'model_trunk', 'logmel_stats', 'random_init')
FIGURES = ('tile_f1', 'clip_f1', 'nmi', 'p_at_5')


def build_instruments(root: str, minutes: float, install: bool) -> dict:
  """Today's instrument set; below DEFAULT_MINUTES, the same built from a seeded share of the tunes."""
  if minutes >= DEFAULT_MINUTES:
    return quality_data.build(root, install=install)
  quality_data.ensure_material(install)
  tunes = quality_data.tune_paths()
  count = max(4, int(round(len(tunes) * minutes / INSTRUMENT_MINUTES)))
  kept = sorted(quality_data.test_tunes(list(tunes), count / len(tunes), seed=1))
  return quality_data.build(root, tunes={t: tunes[t] for t in kept},
                            config=quality_data.settings() | {'tunes_kept': kept}, install=install)


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  what: str  # One line: the material, the labels and the split.
  build: Callable[[str, float, bool], dict]  # (data root, minutes of audio, install) -> build.json contents


TASKS = {
    'instruments': Task('instruments', 'instrument family of real tunes on sampled instruments (split by tune)',
                        build_instruments),
    'speakers': Task('speakers', 'speaker among voices built from recordings of real speakers (split by passage)',
                     lambda root, minutes, install: quality_speech.build(root, minutes=minutes, install=install)),
    'sounds': Task('sounds', 'kind of a recorded everyday sound effect (split by source file)',
                   lambda root, minutes, install: quality_sounds.build(root, minutes=minutes, install=install)),
}


def task_dirs(data_dir: str, task: str, minutes: float) -> tuple[str, str]:
  """(data root, features dir) of a task. The full instrument set is the one `bench quality` uses."""
  if task == 'instruments' and minutes >= DEFAULT_MINUTES:
    return os.path.join(data_dir, 'data'), os.path.join(data_dir, 'features')
  size = '' if minutes >= DEFAULT_MINUTES else f'-{minutes:g}min'
  base = os.path.join(data_dir, 'suite', task + size)
  return os.path.join(base, 'data'), os.path.join(base, 'features')


def nmi_over_kmeans_seeds(workdir: str, features_dir: str, seeds=KMEANS_SEEDS) -> dict[str, float]:
  """{representation: median NMI over k-Means seeds} on the test tiles, in the evaluation's standardised space,
  for the model's two representations and both baselines (the random-init network with the evaluation's seed 0)."""
  # Imported here: the suite's own process loads JAX and the model only to score a finished run.
  import numpy as np
  from dem_jax import evaluate, probes
  from dem_jax.embed import Embedder
  from dem_jax.features import open_features

  features = open_features(features_dir)
  clips = [c for c in features.select(features.test_splits()) if c.label]
  table = evaluate.embed_per_fold(features, clips, {None: Embedder(workdir)}, seed=0)[None]
  labels = np.array([features.label_index(c.label) for c in clips])[table['clip_index']]
  return {name: float(np.median([probes.kmeans_scores(table[name], labels, seed=s, label_names=features.labels,
                                                      space='standardised')['nmi'] for s in seeds]))
          for name in REPRESENTATIONS}


def run_task(flags: argparse.Namespace, overrides: list[str], features_dir: str, workdir: str) -> dict:
  """Trains, evaluates and scores one task in `workdir`; returns its record (also written there)."""
  run = quality.train(flags, overrides, features_dir, workdir)
  eval_dir = os.path.join(workdir, 'eval')
  quality._run([sys.executable, '-m', 'dem_jax', 'evaluate', f'--workdir={workdir}', f'--output_dir={eval_dir}',
                '--noplot'], 'evaluation')
  with open(os.path.join(eval_dir, 'report.json'), encoding='utf-8') as f:
    rows = quality.summary(json.load(f))
  medians = nmi_over_kmeans_seeds(workdir, features_dir)
  figures = {rep: {'tile_f1': rows[rep]['tile_f1'], 'clip_f1': rows[rep]['clip_f1'], 'nmi': medians[rep],
                   'p_at_5': rows[rep]['p_at_5']} for rep in REPRESENTATIONS if rep in rows}
  record = {'config': flags.config, 'minutes': flags.minutes, 'overrides': overrides, 'features_dir': features_dir,
            'set_sha256': quality.set_stamp(features_dir), **run,
            'nmi_kmeans_seed_0': {rep: rows[rep]['nmi'] for rep in figures}, 'figures': figures}
  tmp = os.path.join(workdir, quality.RUN_RECORD + '.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(record, f)
  os.replace(tmp, os.path.join(workdir, quality.RUN_RECORD))
  return record


def finished_or_cleared(flags: argparse.Namespace, overrides: list[str], features_dir: str, workdir: str) -> dict | None:
  """A finished task's record in `workdir` (same settings), or None after clearing what an interrupted run left."""
  record = quality.finished_run(flags, overrides, workdir)
  if record is not None:
    if record.get('features_dir') != features_dir:
      raise quality.QualityBenchError(f'{workdir} holds a run on {record.get("features_dir")}, not {features_dir}; '
                                      'pass a new --workdir.')
    if record.get('set_sha256') != quality.set_stamp(features_dir):
      raise quality.QualityBenchError(f'{workdir} holds a run on an earlier build of the set in {features_dir}; '
                                      'pass a new --workdir.')
    return record
  if os.path.exists(workdir):
    strange = sorted(set(os.listdir(workdir)) - quality.RUN_ENTRIES)
    if strange:
      raise quality.QualityBenchError(f'{workdir} holds {strange[:3]}, which no run of this benchmark writes; pass a '
                                      'new --workdir.')
    print(f'{workdir} holds a run that did not finish; training it again', flush=True)
    shutil.rmtree(workdir)
  return None


def average(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
  """{rep: {figure: mean over the tasks}} for the representations every task reports."""
  reps = [r for r in REPRESENTATIONS if results and all(r in rows for rows in results.values())]
  return {rep: {fig: statistics.fmean(rows[rep][fig] for rows in results.values()) for fig in FIGURES}
          for rep in reps}


def selected_tasks(names: str) -> list[str]:
  tasks = [t.strip() for t in names.split(',') if t.strip()] or list(TASKS)
  unknown = [t for t in tasks if t not in TASKS]
  if unknown or len(set(tasks)) != len(tasks):
    raise quality.QualityBenchError(f'--tasks={names}: name each of {", ".join(TASKS)} at most once.')
  return tasks


def combined(records: list[dict]) -> tuple[dict, dict]:
  """({rep: {figure: mean}}, {rep: {figure: sd}}) over one task's runs (one per training seed)."""
  reps = [r for r in REPRESENTATIONS if all(r in record['figures'] for record in records)]
  values = {rep: {fig: [record['figures'][rep][fig] for record in records] for fig in FIGURES} for rep in reps}
  return ({rep: {fig: statistics.fmean(v) for fig, v in row.items()} for rep, row in values.items()},
          {rep: {fig: statistics.stdev(v) for fig, v in row.items()} for rep, row in values.items()})


def main(flags: argparse.Namespace, overrides: list[str]) -> None:
  minutes = DEFAULT_MINUTES if flags.suite_minutes is None else flags.suite_minutes
  try:
    tasks = selected_tasks(flags.tasks)
  except quality.QualityBenchError as e:
    sys.exit(f'bench quality --suite: {e}')
  workdir = os.path.abspath(flags.workdir or os.path.join(flags.data_dir, 'runs',
                                                          'suite-' + time.strftime('%Y%m%d-%H%M%S')))
  datasets, skipped, exported = {}, {}, {}
  for task in tasks:
    data_root, features_dir = task_dirs(flags.data_dir, task, minutes)
    try:
      built = TASKS[task].build(data_root, minutes, not flags.no_install)
    except quality_data.MissingMaterialError as e:
      skipped[task] = f'needs {", ".join(e.packages)}, which could not be installed'
      print(f'bench quality --suite: task {task} skipped: {skipped[task]}.', flush=True)
      continue
    except quality_data.QualityDataError as e:
      sys.exit(f'bench quality --suite: task {task}: {e}')
    try:
      quality.preprocess(data_root, features_dir, num_workers=flags.num_workers)
      if flags.export_hear:
        exported[task] = hear_export.export_task(task, data_root, flags.export_hear,
                                                 version=f'v{built["settings"]["version"]}')
    except (quality.QualityBenchError, quality_data.QualityDataError) as e:
      sys.exit(f'bench quality --suite: task {task}: {e}')
    datasets[task] = {'what': TASKS[task].what, 'labels': built['labels'], 'files': built['files'],
                      'audio_minutes': round(built['audio_seconds'] / 60, 1), 'data_root': data_root,
                      'features_dir': features_dir}
  head = {'benchmark': 'quality_suite', 'config': flags.config, 'overrides': overrides, 'minutes': flags.minutes,
          'suite_minutes': minutes}
  if flags.build_only:
    print(json.dumps({**head, 'datasets': datasets, 'skipped': skipped, 'hear_tasks': exported}))
    return

  # Seed by seed, every task: a kill leaves whole suites behind it, and each finished run is kept.
  seeds = flags.seeds or [None]
  records: dict[str, list[dict]] = {task: [] for task in datasets}
  for seed in seeds:
    seed_overrides = overrides + ([] if seed is None else [f'--config.seed={seed}'])
    for task in datasets:
      features_dir = datasets[task]['features_dir']
      task_workdir = os.path.join(workdir, *([] if seed is None else [f'seed_{seed}']), task)
      try:
        record = finished_or_cleared(flags, seed_overrides, features_dir, task_workdir)
        if record is not None:
          print(f'task {task}: the finished run in {task_workdir} is kept', flush=True)
        else:
          record = run_task(flags, seed_overrides, features_dir, task_workdir)
      except (quality.QualityBenchError, quality_data.QualityDataError) as e:
        sys.exit(f'bench quality --suite: task {task}: {e}')
      records[task].append(record)
      print(f'task {task}{"" if seed is None else f", training seed {seed}"} ({datasets[task]["audio_minutes"]} min '
            f'of audio, {len(datasets[task]["labels"])} classes; NMI: median over k-Means seeds 0-{KMEANS_SEEDS[-1]}):')
      print(quality.format_table(record['figures']))

  def run_fields(record):
    return {k: v for k, v in record.items() if k != 'figures'}

  if seeds == [None]:
    results = {task: recs[0]['figures'] for task, recs in records.items()}
    runs = {task: run_fields(recs[0]) for task, recs in records.items()}
    mean, extra = average(results), {}
  else:
    results, spread = {}, {}
    for task, recs in records.items():
      results[task], spread[task] = combined(recs)
      print(f'task {task} over training seeds {",".join(map(str, seeds))} (mean +- sd):')
      print(format_mean_sd(results[task], spread[task]))
    runs = {task: {str(seed): run_fields(r) for seed, r in zip(seeds, recs)} for task, recs in records.items()}
    mean = average(results)
    # The average's spread: the sd over training seeds of each seed's average over the tasks.
    per_seed = [average({task: recs[i]['figures'] for task, recs in records.items()}) for i in range(len(seeds))]
    if mean:
      spread['average'] = {rep: {fig: statistics.stdev(a[rep][fig] for a in per_seed) for fig in FIGURES}
                           for rep in mean}
    extra = {'seeds': seeds, 'spread': spread}
  if mean:
    print(f'Average over {", ".join(results)}' + ('' if seeds == [None] else ' (mean +- sd over training seeds)') + ':')
    print(quality.format_table(mean) if seeds == [None] else format_mean_sd(mean, extra['spread']['average']))
  else:
    print('No task ran; no average.')
  print(json.dumps({**head, 'workdir': workdir, **extra, 'tasks': results, 'average': mean,
                    'tasks_averaged': list(results), 'skipped': skipped, 'datasets': datasets, 'runs': runs,
                    'hear_tasks': exported}))


def format_mean_sd(mean: dict[str, dict[str, float]], sd: dict[str, dict[str, float]]) -> str:
  return quality.format_table({rep: {fig: (row[fig], sd[rep][fig]) for fig in row} for rep, row in mean.items()},
                              cell=lambda v: f'{100 * v[0]:.1f} +- {100 * v[1]:.1f}')
