"""Console output of the command lines: progress, and our own lines without the libraries' chatter."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

from absl import logging as absl_logging

# INFO lines from these packages describe every save, or every backend jax probes ("Unable to initialize backend
# 'tpu'"), in detail; their warnings still show.
_QUIET = ('/orbax/', '/jax/_src/', '/jax/experimental/', '/absl/', '/numba/', '/matplotlib/', '/PIL/')


# Warnings that only restate what dem_jax asked for: orbax announces every read-only manager (our readers' choice).
_EXPECTED_WARNINGS = (('/orbax/', 'Given directory is read only'),)


class _DropLibraryInfo(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    if any(path in record.pathname and str(record.msg).startswith(text) for path, text in _EXPECTED_WARNINGS):
      return False
    return record.levelno >= logging.WARNING or not any(q in record.pathname for q in _QUIET)


def quiet_library_logs() -> None:
  """Adds the filter to every handler of the root logger (absl's included); call once the handlers exist."""
  drop = _DropLibraryInfo()
  for handler in logging.getLogger().handlers + [absl_logging.get_absl_handler()]:
    if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
      handler.addFilter(drop)


def quiet_console() -> None:
  """For commands that print a report (evaluate, embed): our INFO lines, none of the libraries' probing.

  jax logs one line per platform it cannot start ('Unable to initialize backend ...') at INFO or WARNING; naming the
  platforms jax is allowed to try, when the user has not, would change which device runs, so those lines are
  filtered instead. Call from `main`, before the first jax computation.
  """
  absl_logging.set_verbosity(absl_logging.INFO)
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.ERROR)
  logging.getLogger('jax').setLevel(logging.WARNING)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # XLA's C++ INFO lines.
  warnings.filterwarnings('ignore', module='orbax')
  quiet_library_logs()


class Progress:
  """Progress of a long loop: a tqdm bar on a terminal; a log line every `log_every_seconds` otherwise.

      progress = Progress('embed', total=len(files), unit='file')
      for path in files:
        ...
        progress.update()
      progress.close()
  """

  def __init__(self, name: str, total: int, *, unit: str = 'item', log_every_seconds: float = 30.0,
               interactive: bool | None = None):
    import tqdm  # Only command lines show a bar.
    self.name, self.total, self.unit = name, total, unit
    self.interactive = sys.stderr.isatty() if interactive is None else interactive
    self.log_every_seconds = log_every_seconds
    self.done, self.start = 0, time.monotonic()
    self.last_log = self.start
    self.bar = tqdm.tqdm(total=total, desc=name, unit=unit, dynamic_ncols=True, disable=not self.interactive)

  def update(self, n: int = 1, *, note: str = '') -> None:
    """`n` more done; `note` says what was just finished (shown beside the bar and in the log line)."""
    self.done += n
    if note:
      self.bar.set_postfix_str(note, refresh=False)
    self.bar.update(n)
    now = time.monotonic()
    if not self.interactive and (now - self.last_log >= self.log_every_seconds or self.done == self.total):
      self.last_log = now
      rate = self.done / max(now - self.start, 1e-9)
      eta = (self.total - self.done) / rate if rate > 0 else float('inf')
      logging.info('%s: %d/%d %ss, %.2f %ss/s, ETA %.0f s%s', self.name, self.done, self.total, self.unit, rate,
                   self.unit, eta, f' ({note})' if note else '')

  def close(self) -> None:
    self.bar.close()
