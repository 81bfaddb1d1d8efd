"""Console logging: our progress lines, without the checkpoint library's per-save chatter."""

import logging

from absl import logging as absl_logging

_QUIET = ('/orbax/',)  # INFO lines from these packages describe every save in detail; warnings still show.


class _DropLibraryInfo(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(q in record.pathname for q in _QUIET)


def quiet_library_logs() -> None:
  """Adds the filter to every handler of the root logger (absl's included); call once the handlers exist."""
  drop = _DropLibraryInfo()
  for handler in logging.getLogger().handlers + [absl_logging.get_absl_handler()]:
    if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
      handler.addFilter(drop)
