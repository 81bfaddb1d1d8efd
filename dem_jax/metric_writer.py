"""Training metrics: WORKDIR/metrics.jsonl (one JSON object per line, with its step) and TensorBoard event files.

Only process 0 writes; other processes get a writer that does nothing. A resumed run passes the step it resumes
from as `purge_step`: records of later steps, written by the run that was killed, disappear from metrics.jsonl and
(through tensorboardX's purge_step) from TensorBoard, so both read as one uninterrupted run. A half-written last
line of metrics.jsonl (a kill mid-write) is dropped; the records before it stay. The log is for reading, not for
resuming: what a resumed run needs (the time budget's clock, the schedule's length) is saved with each checkpoint.

TensorBoard also gets the run's hyperparameters (`write_hparams`), the evaluation's figures (`write_figures`) and an
embedding-projector export of labelled embeddings (`write_embedding`). Without tensorboardX (the `plots` extra) the
writer says so once and keeps metrics.jsonl alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from typing import Any, Sequence

import numpy as np

METRICS_NAME = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


def _clean(value):
  value = float(value)
  return value if math.isfinite(value) else str(value)  # JSON has no NaN; keep it visible as a string.


def _parse_records(path: str) -> list[dict]:
  """The records of a metrics.jsonl; an unreadable last line (a write cut short) is left out, one elsewhere raises."""
  with open(path, encoding='utf-8', errors='replace') as f:
    lines = [line for line in f.read().split('\n') if line.strip()]
  records = []
  for number, line in enumerate(lines, 1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if number == len(lines):
        logging.warning('%s: dropped a half-written last line (%d characters).', path, len(line))
        break
      raise ValueError(f'{path}, line {number}, is not JSON: the file is damaged. Move it away to start the '
                       'metrics afresh (checkpoints are not affected).') from None
  return records


def _flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}, with values TensorBoard's hparams take (numbers, strings, bools)."""
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      flat |= _flatten(value, f'{name}.')
    elif isinstance(value, (bool, int, float, str)):
      flat[name] = value
    else:
      flat[name] = str(value)
  return flat


class MetricWriter:
  """Writes metrics to WORKDIR/metrics.jsonl and WORKDIR/tensorboard.

  Args:
    workdir: the run's folder.
    enabled: False on every process but the first: nothing is written.
    tensorboard: False for metrics.jsonl alone.
    jsonl: False for TensorBoard alone, leaving metrics.jsonl untouched (a reader such as `evaluate` adding its
      figures to a workdir that a training may be writing to).
    purge_step: the step a resumed run starts from (the restored checkpoint's); records of later steps are dropped.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True, jsonl: bool = True,
               purge_step: int | None = None):
    self.enabled = enabled
    self.jsonl = jsonl
    self.path = os.path.join(workdir, METRICS_NAME)
    self._tb = None
    if not enabled:
      return
    if jsonl and os.path.exists(self.path):
      self._rewrite([r for r in _parse_records(self.path) if purge_step is None or r['step'] <= purge_step])
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # Only process 0 needs it.
      except ImportError:
        logging.warning('tensorboardX is not installed (pip install dem_jax[plots]); metrics go to %s only.',
                        self.path)
      else:
        # tensorboardX drops events at and after its purge_step: the first step the resumed run writes.
        self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR),
                                 purge_step=None if purge_step is None else purge_step + 1)

  def _rewrite(self, records: list[dict]) -> None:
    tmp = self.path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(r) + '\n' for r in records)
    os.replace(tmp, self.path)

  def truncate_after(self, step: int) -> None:
    """Drop records with a step later than `step` from metrics.jsonl (as `purge_step` does at construction)."""
    if self.enabled and self.jsonl and os.path.exists(self.path):
      self._rewrite([r for r in _parse_records(self.path) if r['step'] <= step])

  def write(self, step: int, metrics: dict, *, prefix: str = '') -> None:
    if not self.enabled:
      return
    if self.jsonl:
      record = {'step': int(step)} | {f'{prefix}{k}': _clean(v) for k, v in metrics.items()}
      try:
        with open(self.path, 'a', encoding='utf-8') as f:
          f.write(json.dumps(record) + '\n')
      except OSError as e:  # A failed write (a full disk) names no file; the one-line report needs it.
        raise OSError(e.errno, e.strerror, e.filename or self.path) from None
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f'{prefix}{k}', float(v), int(step))

  def write_hparams(self, hparams: dict, metrics: dict[str, float] | None = None) -> None:
    """The run's hyperparameters (nested dicts are flattened to 'a.b') for TensorBoard's HPARAMS tab.

    `metrics` names the scalar tags to show beside them (e.g. {'eval/loss': 0.0}); their values come from the
    scalars the run writes under those tags.
    """
    if self._tb is None:
      return
    from tensorboardX.summary import hparams as hparams_summary
    experiment, session_start, session_end = hparams_summary(_flatten(hparams), dict(metrics or {}))
    for summary in (experiment, session_start, session_end):
      self._tb.file_writer.add_summary(summary)

  def write_figures(self, step: int, figures: dict) -> None:
    """matplotlib figures as TensorBoard images at `step` ({tag: Figure}, e.g. dem_jax.plots' return values)."""
    if self._tb is None:
      return
    for tag, figure in figures.items():
      self._tb.add_figure(tag, figure, int(step), close=False)

  def write_embedding(self, step: int, embeddings: np.ndarray, labels: Sequence[str], *, tag: str) -> None:
    """An embedding-projector export: [N, E] vectors with one label each, at `step` (replacing an earlier export of
    the same step and tag)."""
    if self._tb is None:
      return
    # tensorboardX refuses to reuse the export's folder (with a print), so a re-evaluated step starts afresh.
    shutil.rmtree(os.path.join(self._tb.logdir, f'{int(step):05d}', self._tb._encode(tag)), ignore_errors=True)
    self._tb.add_embedding(np.asarray(embeddings, np.float32), metadata=[str(label) for label in labels],
                           global_step=int(step), tag=tag)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl, in order (a half-written last line left out)."""
  return _parse_records(os.path.join(workdir, METRICS_NAME))
