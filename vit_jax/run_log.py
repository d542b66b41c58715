"""A run's log file: what the libraries say goes to `workdir/run.log`, not the console.

While a run trains, the console shows vit_jax's own lines and other libraries' one-line
warnings; a library's traceback (orbax reports a failed write once per array) goes only to
the log file, where the one-line error that ends the run points.

Layer 4 of vit_jax.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

LOG_FILE = "run.log"


class _QuietFileHandler(logging.FileHandler):
  def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging names it
    """A log that cannot be written (a full disk) must not print a traceback of its own."""

  def close(self) -> None:
    """Nor may closing it, when what it still buffers finds the disk full: the run's own
    error (which names what could not be written) is the one to report."""
    try:
      super().close()
    except OSError:
      self.stream = None


class _OwnLinesOnly(logging.Filter):
  """Passes vit_jax's records, and other libraries' warnings of one line with no traceback."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == "vit_jax" or record.name.startswith("vit_jax."):
      return True
    return (record.levelno >= logging.WARNING and not record.exc_info
            and "\n" not in record.getMessage())


@contextlib.contextmanager
def logging_to(workdir: Path, enabled: bool = True) -> Iterator[Path]:
  """Within the block, every log record also goes to workdir/run.log, and the console's
  handlers pass only `_OwnLinesOnly`; yields the log file's path."""
  path = Path(workdir) / LOG_FILE
  if not enabled:
    yield path
    return
  root = logging.getLogger()
  console = list(root.handlers)
  handler = _QuietFileHandler(path, delay=True)
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  own_lines = _OwnLinesOnly()
  for h in console:
    h.addFilter(own_lines)
  root.addHandler(handler)
  try:
    yield path
  finally:
    while _STILL_DIVERTED and not PROCESS_ENDS_ON_FAILURE:
      _restore_stderr(_STILL_DIVERTED.pop())
    root.removeHandler(handler)
    handler.close()
    for h in console:
      h.removeFilter(own_lines)


_STILL_DIVERTED: list[int] = []  # saved descriptors of a stderr left in the log after a failure
# Set by `command_line.ending_in_one_line`, whose process ends when a run fails: a stderr
# diverted after a failed write then stays in the log to the end, and the error line goes out
# through `console_fd`.
PROCESS_ENDS_ON_FAILURE = False


def console_fd() -> int:
  """The console's stderr, also while stderr is diverted into a run's log."""
  return _STILL_DIVERTED[0] if _STILL_DIVERTED else 2


@contextlib.contextmanager
def stderr_into_log(workdir: Path) -> Iterator[None]:
  """Within the block, the process's stderr (file descriptor 2, so C++ threads' output too)
  appends to the run's log. If the block raises, it stays there until `logging_to`'s block
  ends: after a failed checkpoint write, the writes still in flight in orbax's and
  tensorstore's threads fail too, later, each printing a traceback, which belongs in the log."""
  sys.stderr.flush()
  saved = os.dup(2)
  log_file = os.open(Path(workdir) / LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  os.dup2(log_file, 2)
  os.close(log_file)
  try:
    yield
  except BaseException:
    _STILL_DIVERTED.append(saved)
    raise
  else:
    _restore_stderr(saved)


def _restore_stderr(saved: int) -> None:
  sys.stderr.flush()
  os.dup2(saved, 2)
  os.close(saved)


@contextlib.contextmanager
def absl_quiet():
  """Only errors from absl's logger meanwhile (e.g. orbax's warning that a read-only
  checkpoint manager's directory is read only: it is meant to be)."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)
