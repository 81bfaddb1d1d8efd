"""Training metrics: WORKDIR/metrics.jsonl (one JSON object per line, with its step) and TensorBoard event files.

Only process 0 writes; other processes get a writer that does nothing. On resume, records after the restored step
are dropped from metrics.jsonl, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os

METRICS_NAME = 'metrics.jsonl'


def _clean(value):
  value = float(value)
  return value if math.isfinite(value) else str(value)  # JSON has no NaN; keep it visible as a string.


class MetricWriter:

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_NAME)
    self._tb = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter  # Only process 0 needs it.
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def truncate_after(self, step: int) -> None:
    """Drop records with a step later than `step` (written after the checkpoint a resumed run starts from)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path, encoding='utf-8') as f:
      kept = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
    tmp = self.path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: dict, *, prefix: str = '') -> None:
    if not self.enabled:
      return
    record = {'step': int(step)} | {f'{prefix}{k}': _clean(v) for k, v in metrics.items()}
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f'{prefix}{k}', float(v), int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, METRICS_NAME)
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]
