r"""Quality on real audio within a training budget: the model against the no-learning baselines.

    dem-jax bench quality [--minutes=15] [--config=music:cpu] [--config.loss.name=infonce ...]
    dem-jax bench quality --seeds=0,1,2,3,4      # one run per training seed, then each figure over them
    dem-jax bench quality --build_only          # only build (or find) the data set and its features
    dem-jax bench quality --suite [--tasks=instruments,speakers,sounds] [--suite_minutes=60] [--export_hear=DIR]
                                                # every task of the suite (dem_jax/benchmarks/quality_suite.py)

1. Builds, once, the labelled set of dem_jax.benchmarks.quality_data (real tunes on sampled instruments, 6
   instrument families, split by tune; about 80 minutes of audio) under --data_dir, and preprocesses it with the
   preprocessing job (`dem-jax preprocess --dataset=folder --split_file=...`). Both are cached.
2. Trains through the training CLI within --minutes of wall time: with config.train_minutes when the config has it
   (the config's own length, num_steps or num_epochs, still ends the run if it comes first), otherwise for as many
   steps as a short calibration run of the same config says fit in the budget (held-out monitoring then runs once,
   at the end, and is not counted).
3. Evaluates through the evaluation CLI and prints, for the model and each baseline, tile and clip macro F1 of the
   linear probe, k-Means NMI and precision@5, what the model's clusters follow (`clusters_follow`: NMI against
   family, instrument program and tune), and how far NMI moves with the k-Means seed alone
   (`nmi_over_kmeans_seeds`: min, median, max over seeds 0-9); the last line is JSON.
Any `--config.X=V` is passed to training as it is; `--config.num_steps=N` sets the budget in steps instead (no
calibration), e.g. to compare objectives at equal steps.

Training seeds move these figures by several points (docs/quality.md), so a recipe is judged over seeds:
`--seeds=0,1,2` trains and scores one run per seed (`--config.seed=N`, in WORKDIR/seed_N), prints each run's
figures, then their mean, standard deviation, min and max, and the JSON line holds both. Each finished run leaves
its figures in its directory (quality.json), so the same command started again after a kill keeps the runs done,
trains the interrupted one again from the start, and goes on with the rest. Where a calibration run sets the
budget, it runs for the first seed only, and the other seeds train for the same number of steps.
"""

import argparse
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

from dem_jax import configs
from dem_jax.benchmarks import quality_data
from dem_jax.metric_writer import read_metrics

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'dem_jax', 'quality')
# Rate measured between the logs of the first two (70 steps: a shorter window is at the mercy of a busy machine);
# the run ends at the third.
CALIBRATION_STEPS = (20, 90, 100)


class QualityBenchError(RuntimeError):
  pass


def parse_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  p = argparse.ArgumentParser(prog='python -m dem_jax.bench quality', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--minutes', type=float, default=15.0, help='training budget in wall-clock minutes')
  p.add_argument('--config', default='music:cpu', help='training config: a short name (music:cpu) or a path')
  p.add_argument('--data_dir', default=DEFAULT_DATA_DIR, help='where the set and its features are cached')
  p.add_argument('--workdir', default=None, help='training workdir (default: DATA_DIR/runs/<time>)')
  p.add_argument('--build_only', action='store_true', help='build the set and its features, then stop')
  p.add_argument('--no_install', action='store_true', help='never install missing packages; fail with the command')
  p.add_argument('--num_workers', type=int, default=os.cpu_count() or 1, help='preprocessing worker processes')
  p.add_argument('--seeds', default='', help='comma-separated training seeds: one run each (WORKDIR/seed_N), then '
                 'every figure over them (mean, standard deviation, min, max); default: one run, the config\'s seed')
  suite = p.add_argument_group('the suite (dem_jax/benchmarks/quality_suite.py)')
  suite.add_argument('--suite', action='store_true',
                     help='every task of the suite (instruments, speakers, sounds), each trained within --minutes')
  suite.add_argument('--tasks', default='', help='with --suite: comma-separated task names (default: all)')
  suite.add_argument('--suite_minutes', type=float, default=None,
                     help='with --suite: minutes of audio per task (default 60; less for a quick check)')
  suite.add_argument('--export_hear', default='',
                     help='with --suite: also export every task built, in the HEAR 2021 task format, under this folder')
  flags, rest = p.parse_known_args(argv)
  unknown = [a for a in rest if not a.startswith('--config.')]
  if unknown:
    p.error(f'unrecognised arguments {unknown}; only --config.X=V settings are passed on to training')
  if flags.minutes <= 0:
    p.error(f'--minutes={flags.minutes} must be positive')
  try:
    flags.seeds = [int(v) for v in flags.seeds.split(',')] if flags.seeds.strip() else []
  except ValueError:
    p.error(f'--seeds={flags.seeds}: give training seeds as integers separated by commas, e.g. --seeds=0,1,2')
  if len(set(flags.seeds)) != len(flags.seeds) or any(v < 0 for v in flags.seeds) or len(flags.seeds) == 1:
    p.error(f'--seeds={",".join(map(str, flags.seeds))}: give two or more different seeds >= 0 (one run needs no '
            '--seeds: use --config.seed=N)')
  if flags.seeds and any(a.startswith('--config.seed=') for a in rest):
    p.error('--seeds and --config.seed both set the training seed; give one of them')
  if not flags.suite and (flags.tasks or flags.suite_minutes is not None or flags.export_hear):
    p.error('--tasks, --suite_minutes and --export_hear belong to the suite; add --suite')
  if flags.suite_minutes is not None and flags.suite_minutes <= 0:
    p.error(f'--suite_minutes={flags.suite_minutes} must be positive')
  return flags, rest


def _run(cmd: list[str], what: str) -> None:
  print('+ ' + ' '.join(cmd), flush=True)
  result = subprocess.run(cmd, cwd=REPO_ROOT, check=False)
  if result.returncode:
    raise QualityBenchError(f'{what} failed (exit {result.returncode}); its output is above.')


def prepare(data_dir: str, *, install: bool = True, num_workers: int = 1) -> tuple[dict, str]:
  """(build.json contents, features dir): the set and its features, built if not cached."""
  data_root = os.path.join(data_dir, 'data')
  built = quality_data.build(data_root, install=install)
  features_dir = os.path.join(data_dir, 'features')
  preprocess(data_root, features_dir, num_workers=num_workers)
  return built, features_dir


SET_STAMP = 'set.sha256'  # In a features dir: the sha256 of the build.json of the set it was made from.


def set_stamp(features_dir: str) -> str | None:
  """Which build of a set the features in `features_dir` were made from (SET_STAMP), or None if unrecorded."""
  path = pathlib.Path(features_dir, SET_STAMP)
  return path.read_text(encoding='utf-8').strip() if path.exists() else None


def preprocess(data_root: str, features_dir: str, *, num_workers: int = 1) -> None:
  """The features of a built set (DATA_ROOT/audio, DATA_ROOT/split.csv) in features_dir, unless made from this very
  build already; features of an earlier build of the set (other settings, another version) are made again."""
  with open(os.path.join(data_root, 'build.json'), 'rb') as f:
    stamp = hashlib.sha256(f.read()).hexdigest()
  if os.path.exists(os.path.join(features_dir, 'features.json')):
    if set_stamp(features_dir) == stamp:
      return
    print(f'{features_dir} holds the features of another build of {data_root}; preprocessing again', flush=True)
  shutil.rmtree(features_dir, ignore_errors=True)
  _run([sys.executable, '-m', 'dem_jax', 'preprocess', '--dataset=folder', f'--data_dir={os.path.join(data_root, "audio")}',
        f'--output_dir={features_dir}', f'--split_file={os.path.join(data_root, "split.csv")}',
        f'--num_workers={num_workers}', '--strict'], 'preprocessing')
  pathlib.Path(features_dir, SET_STAMP).write_text(stamp + '\n', encoding='utf-8')


def config_has_train_minutes(config_arg: str) -> bool:
  """Whether the training config knows config.train_minutes (then the budget is the trainer's own)."""
  path, _, arg = configs.resolve(config_arg).partition(':')
  path = REPO_ROOT / path  # A relative path is the checkout's; an absolute one stays as it is.
  spec = importlib.util.spec_from_file_location('quality_bench_config', path)
  if spec is None or not os.path.exists(path):
    raise QualityBenchError(f'--config={config_arg}: {path} is not a Python config file.')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return 'train_minutes' in module.get_config(arg or None)


def steps_per_second(metrics: list[dict], first: int, second: int) -> float:
  """Training rate between two logged steps, from the cumulative rates that training logs (compilation excluded)."""
  rates = {m['step']: m['train/steps_per_s'] for m in metrics if 'train/steps_per_s' in m}
  if first not in rates or second not in rates or rates[first] <= 0 or rates[second] <= 0:
    raise QualityBenchError(f'the calibration run did not log steps {first} and {second} (logged: {sorted(rates)}).')
  return (second - first) / (second / rates[second] - first / rates[first])


UNCAPPED = 10**9  # Steps no budget reaches.


def budget_steps(rate: float, minutes: float) -> int:
  steps = int(math.floor(rate * minutes * 60 + 1e-6))  # 1e-6: 2.25 steps/s x 120 s is 270 steps, not 269
  if steps < 1:
    raise QualityBenchError(f'--minutes={minutes} is too short for one training step at {rate:.3f} steps/s.')
  return steps


def train(flags: argparse.Namespace, overrides: list[str], features_dir: str, workdir: str) -> dict:
  """Trains within the budget through the CLI; returns what it did (steps, how the budget was applied, wall time)."""
  base = [sys.executable, '-m', 'dem_jax', 'train', f'--config={flags.config}', f'--config.features_dir={features_dir}']
  if any(o.startswith('--config.num_steps=') for o in overrides):
    how, extra, rate = 'num_steps given', [], None  # A budget in steps (e.g. to compare losses at equal steps).
  elif config_has_train_minutes(flags.config):
    # The budget caps the length and the config's own length stands (a recipe may stop sooner: `:cpu` does on a
    # small set); held-out monitoring and the checkpoint at the end only.
    how, rate = 'config.train_minutes', None
    extra = [f'--config.train_minutes={flags.minutes}', f'--config.eval_every={UNCAPPED}',
             f'--config.checkpoint_every={UNCAPPED}']
  else:
    first, second, last = CALIBRATION_STEPS
    calibration = os.path.join(workdir, 'calibration')
    # The calibration settings come after the overrides: the last of repeated flags wins.
    _run(base + overrides + [f'--workdir={calibration}', f'--config.num_steps={last}',
                             f'--config.log_every={first // 2}', f'--config.eval_every={10 * last}',
                             f'--config.checkpoint_every={10 * last}'], 'the calibration run')
    rate = steps_per_second(read_metrics(calibration), first, second)
    num_steps = budget_steps(rate, flags.minutes)
    # Held-out monitoring only at the end, as in the calibration run, so that the rate holds for the whole run.
    how, extra = f'num_steps from a calibration run at {rate:.3f} steps/s', [
        f'--config.num_steps={num_steps}', f'--config.eval_every={num_steps}']
  start = time.time()
  _run(base + [f'--workdir={workdir}'] + extra + overrides, 'training')
  wall = time.time() - start
  steps = max((m['step'] for m in read_metrics(workdir)), default=0)
  return {'budget': how, 'steps': steps, 'train_wall_seconds': round(wall, 1), 'calibration_steps_per_s': rate}


def summary(report: dict) -> dict[str, dict[str, float]]:
  """{system: {tile_f1, clip_f1, nmi, p_at_k}} for every representation and baseline of an evaluate report."""
  systems = {k: v for k, v in report.items() if isinstance(v, dict) and 'linear_probe' in v}
  systems |= report.get('baselines', {})
  return {name: {'tile_f1': fig['linear_probe']['macro_f1_tile'], 'clip_f1': fig['linear_probe']['macro_f1_clip'],
                 'nmi': fig['kmeans']['nmi'], f'p_at_{fig["retrieval"]["k"]}': fig['retrieval']['precision_at_k']}
          for name, fig in systems.items()}


def cluster_figures(workdir: str, features_dir: str, *, seed: int = 0,
                    spread_seeds: int = 10) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
  """What the evaluation's k-Means clusters of the test tiles follow, and how far NMI moves with the k-Means seed.

  Returns (follow, spread), each {representation: ...}:
  - follow: {source: NMI}. The same clustering as `evaluate`'s (k = the number of families, standardised space,
    same seed), scored against the family (the label: equals the report's NMI), the instrument program that played
    the excerpt (34 on the test side), and the tune. High NMI against the program with low against the tune means
    the clusters gather timbre, at a finer grain than the families, rather than melodies.
  - spread: {'min', 'median', 'max'} of NMI against the family over k-Means seeds 0..spread_seeds-1 (what
    `evaluate --seed=N` would report), on the same embedding. One clustering's NMI is a noisy estimate here;
    the median is the steadier figure to rank recipes by.
  """
  # Imported here: the benchmark's own process loads JAX and the model only to score a finished run.
  import numpy as np
  from sklearn.metrics import normalized_mutual_info_score

  from dem_jax import probes
  from dem_jax.embed import Embedder
  from dem_jax.features import open_features

  features = open_features(features_dir)
  table = Embedder(workdir).embed_features(features, features.select(features.test_splits()), trunk=True)

  def per_tile(values: list) -> np.ndarray:
    return np.unique(np.asarray(values), return_inverse=True)[1][table['clip_index']]

  clips = table['clips']
  family = np.array([features.label_index(c.label) for c in clips])[table['clip_index']]
  sources = {'family': family, 'program': per_tile([dict(c.extra).get('program', '') for c in clips]),
             'tune': per_tile([c.group for c in clips])}
  follow, spread = {}, {}
  for name, key in (('model', 'embeddings'), ('model_trunk', 'trunk')):
    # One clustering per k-Means seed; `seed`'s also serves `follow`.
    runs = {s: probes.kmeans_scores(table[key], family, seed=s, label_names=features.labels, space='standardised',
                                    return_assignments=True) for s in {seed, *range(spread_seeds)}}
    follow[name] = {source: float(normalized_mutual_info_score(values, runs[seed][1]))
                    for source, values in sources.items()}
    nmi = [runs[s][0]['nmi'] for s in range(spread_seeds)]
    spread[name] = {'min': min(nmi), 'median': float(np.median(nmi)), 'max': max(nmi)}
  return follow, spread


RUN_RECORD = 'quality.json'  # A finished run's figures, in its workdir.
# What training, evaluation and this benchmark write in a run's workdir: a seed's directory holding only these and
# no RUN_RECORD is a run of this command that stopped early, safe to remove and train again.
RUN_ENTRIES = {'checkpoints', 'config.json', 'model.json', 'model.json.tmp', 'metrics.jsonl', 'tensorboard', 'eval',
               'calibration', RUN_RECORD + '.tmp'}


def run_once(flags: argparse.Namespace, overrides: list[str], features_dir: str, workdir: str) -> dict:
  """Trains, evaluates and clusters one run in `workdir`; returns its record (also written there as RUN_RECORD)."""
  if os.path.exists(os.path.join(workdir, 'checkpoints')):
    raise QualityBenchError(f'{workdir} already holds a run; pass a new --workdir, or remove that directory to '
                            'train it again.')
  run = train(flags, overrides, features_dir, workdir)
  eval_dir = os.path.join(workdir, 'eval')
  _run([sys.executable, '-m', 'dem_jax', 'evaluate', f'--workdir={workdir}', f'--output_dir={eval_dir}'], 'evaluation')
  with open(os.path.join(eval_dir, 'report.json'), encoding='utf-8') as f:
    rows = summary(json.load(f))
  follow, spread = cluster_figures(workdir, features_dir)
  record = {'config': flags.config, 'minutes': flags.minutes, 'overrides': overrides, 'workdir': workdir, **run,
            'figures': rows, 'clusters_follow': follow,
            'nmi_over_kmeans_seeds': spread}
  tmp = os.path.join(workdir, RUN_RECORD + '.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(record, f)
  os.replace(tmp, os.path.join(workdir, RUN_RECORD))
  return record


def finished_run(flags: argparse.Namespace, overrides: list[str], workdir: str) -> dict | None:
  """The record a finished run left in `workdir`, or None; a run of other settings there is an error."""
  path = os.path.join(workdir, RUN_RECORD)
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    record = json.load(f)
  wanted = {'config': flags.config, 'minutes': flags.minutes, 'overrides': overrides}
  found = {k: record.get(k) for k in wanted}
  if found != wanted:
    raise QualityBenchError(f'{workdir} holds a run with the settings {found}, not {wanted}; pass a new --workdir.')
  return record


def over_seeds(records: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
  """{system: {figure: {mean, sd, min, max}}} over runs; 'nmi_median' is the median NMI over k-Means seeds."""
  values: dict[str, dict[str, list[float]]] = {}
  for record in records:
    for system, row in record['figures'].items():
      for name, v in row.items():
        values.setdefault(system, {}).setdefault(name, []).append(v)
    for system, spread in record['nmi_over_kmeans_seeds'].items():
      values.setdefault(system, {}).setdefault('nmi_median', []).append(spread['median'])
  return {system: {name: {'mean': statistics.fmean(v), 'sd': statistics.stdev(v), 'min': min(v), 'max': max(v)}
                   for name, v in row.items()} for system, row in values.items()}


def format_table(rows: dict[str, dict], *, title: str = 'system', cell=lambda v: f'{100 * v:.1f}') -> str:
  """A Markdown table of {system: {figure: value}}: the first row's figures as columns, `cell` for each value."""
  columns = list(next(iter(rows.values())))
  lines = [f'| {title} | ' + ' | '.join(columns) + ' |', '|---' * (len(columns) + 1) + '|']
  lines += [f'| {name} | ' + ' | '.join(cell(row[c]) if c in row else '' for c in columns) + ' |'
            for name, row in rows.items()]
  return '\n'.join(lines)


def print_run(record: dict) -> None:
  print(format_table(record['figures']))
  print('k-Means NMI of the same clusters against: ' + '; '.join(
      f'{name}: ' + ', '.join(f'{source} {100 * v:.1f}' for source, v in nmi.items())
      for name, nmi in record['clusters_follow'].items()))
  print('k-Means NMI over k-Means seeds 0-9 (min / median / max): ' + '; '.join(
      f'{name}: {100 * v["min"]:.1f} / {100 * v["median"]:.1f} / {100 * v["max"]:.1f}'
      for name, v in record['nmi_over_kmeans_seeds'].items()))


def format_over_seeds(combined: dict[str, dict[str, dict[str, float]]]) -> str:
  return format_table(combined, title='system (mean +- sd, min-max)', cell=lambda v: (
      f'{100 * v["mean"]:.1f} +- {100 * v["sd"]:.1f} ({100 * v["min"]:.1f}-{100 * v["max"]:.1f})'))


def run_seeds(flags: argparse.Namespace, overrides: list[str], features_dir: str, workdir: str) -> list[dict]:
  """One run per seed of `flags.seeds` in WORKDIR/seed_N, finished runs read back; their records, in order."""
  records = []
  for seed in flags.seeds:
    seed_dir = os.path.join(workdir, f'seed_{seed}')
    # Where a calibration run set the first seed's budget, its steps are every other seed's: the seeds differ in
    # the seed alone, not in how busy the machine was when each was calibrated.
    first = records[0] if records else None
    shared_steps = ([f'--config.num_steps={first["steps"]}']
                    if first and first.get('calibration_steps_per_s') is not None else [])
    seed_overrides = overrides + shared_steps + [f'--config.seed={seed}']
    record = finished_run(flags, seed_overrides, seed_dir)
    if record is not None:
      print(f'seed {seed}: the finished run in {seed_dir} is kept', flush=True)
    else:
      if os.path.exists(seed_dir):  # This command's own run, stopped before its figures: trained again.
        strange = sorted(set(os.listdir(seed_dir)) - RUN_ENTRIES)
        if strange:
          raise QualityBenchError(f'{seed_dir} holds {strange[:3]}, which no run of this benchmark writes; pass a '
                                  'new --workdir.')
        print(f'seed {seed}: {seed_dir} holds a run that did not finish; training it again', flush=True)
        shutil.rmtree(seed_dir)
      record = run_once(flags, seed_overrides, features_dir, seed_dir)
    print(f'seed {seed}:')
    print_run(record)
    records.append(record)
  return records


def main(argv: list[str]) -> None:
  flags, overrides = parse_flags(argv)
  if flags.suite:
    from dem_jax.benchmarks import quality_suite  # pylint: disable=import-outside-toplevel  # It imports this module.
    quality_suite.main(flags, overrides)
    return
  try:
    built, features_dir = prepare(flags.data_dir, install=not flags.no_install, num_workers=flags.num_workers)
    dataset = {'features_dir': features_dir, 'files': built['files'], 'tunes': built['tunes'],
               'audio_minutes': round(built['audio_seconds'] / 60, 1), 'labels': built['labels']}
    if flags.build_only:
      print(json.dumps({'benchmark': 'quality', 'dataset': dataset}))
      return
    workdir = os.path.abspath(flags.workdir or os.path.join(flags.data_dir, 'runs', time.strftime('%Y%m%d-%H%M%S')))
    if flags.seeds:
      records = run_seeds(flags, overrides, features_dir, workdir)
    else:
      record = run_once(flags, overrides, features_dir, workdir)
  except (quality_data.QualityDataError, QualityBenchError) as e:
    sys.exit(f'bench quality: {e}')
  head = {'benchmark': 'quality', 'config': flags.config, 'overrides': overrides, 'minutes': flags.minutes,
          'workdir': workdir}
  if not flags.seeds:
    print_run(record)
    print(json.dumps({**head, **{k: v for k, v in record.items() if k not in head}, 'dataset': dataset}))
    return
  combined = over_seeds(records)
  print(f'Over training seeds {",".join(map(str, flags.seeds))} '
        '(nmi_median: the median NMI over k-Means seeds 0-9 of each run):')
  print(format_over_seeds(combined))
  print(json.dumps({**head, 'seeds': flags.seeds, 'dataset': dataset, 'over_seeds': combined,
                    'runs': {str(seed): record for seed, record in zip(flags.seeds, records)}}))
