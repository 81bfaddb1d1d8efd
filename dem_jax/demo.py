"""The whole job on built-in sample data, as `dem-jax demo [WORKDIR]` (and `./launch.sh demo`) runs it.

Writes a synthetic DCASE 2018 task 5 development set, preprocesses it, trains the tiny config, evaluates the model
beside the two no-learning baselines, and prints the headline figures and where the report is. Each stage is
skipped when its output is already complete, so a second run (or one after an interruption) finishes quickly.
"""

from __future__ import annotations

import os
import time


def run_demo(workdir: str) -> dict:
  from dem_jax.configs import dcase as dcase_config
  from dem_jax.configs import features as features_config
  from dem_jax import evaluate as evaluate_lib
  from dem_jax import report_markdown
  from dem_jax import train as train_lib
  from dem_jax.preprocess import job
  from dem_jax.preprocess import sample_data

  workdir = os.path.abspath(workdir)
  data_dir = os.path.join(workdir, 'sample_dcase')
  features_dir = os.path.join(workdir, 'features')
  train_dir = os.path.join(workdir, 'train')
  t0 = time.time()

  def stage(text):
    print(f'[{time.time() - t0:6.1f} s] {text}', flush=True)

  if not os.path.exists(os.path.join(data_dir, 'meta.txt')):
    stage(f'1/4 writing sample data (DCASE 2018 task 5 layout) to {data_dir}')
    sample_data.write_dcase2018_task5(data_dir, sessions_per_label=4, clips_per_session=3, nodes=2)
  stage(f'2/4 preprocessing to log-Mel features in {features_dir}')
  summary = job.run(features_config.get_config(), dataset='dcase2018_task5', data_dir=data_dir,
                    output_dir=features_dir, num_workers=min(2, os.cpu_count() or 1))
  stage(f'    {summary["clips_written"]} clips, {summary["audio_seconds"] / 60:.0f} min of audio, '
        f'{len(summary["failures"])} failures')
  config = dcase_config.get_config('tiny')
  config.features_dir = features_dir
  # Twice the tiny width and steps: a few minutes on a small CPU, and enough for the model to pull ahead of the
  # baselines on most figures (docs/benchmarks.md, "What the demo shows").
  config.model.width = 0.25
  config.model.embedding_dim = 64
  config.num_steps = 600
  config.eval_every = config.checkpoint_every = 200
  stage(f'3/4 training ResNet18 (width {config.model.width}) for {config.num_steps} steps in {train_dir}')
  train_lib.train_and_evaluate(config, train_dir)
  stage('4/4 evaluating: linear probe (4 folds), k-Means, retrieval, beside two baselines')
  report = evaluate_lib.evaluate(train_dir, features_dir=features_dir,
                                 output_dir=os.path.join(workdir, 'report'))
  print()
  print(report_markdown.format_summary_table(report))
  print()
  print(f'report:  {os.path.join(report["output_dir"], "report.md")}')
  print(f'plots:   {report["output_dir"]}/*.png')
  print(f'metrics: {os.path.join(train_dir, "metrics.jsonl")} (TensorBoard: {os.path.join(train_dir, "tensorboard")})')
  stage('done')
  return report
