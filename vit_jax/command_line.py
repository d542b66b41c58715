"""How a command ends on a failure its user can fix: one line on the console, not a traceback.

Layer 5 of vit_jax: shared by launch.py and experiments/sweep_heads.py.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable


def ending_in_one_line(command: Callable[[], None]) -> None:
  """Runs `command`. A bad config, data or file (ValueError, OSError) or a non-finite loss
  ends the process with 'error: ...' and exit status 2; SIGTERM or Ctrl-C, once training has
  saved its checkpoint, with 'interrupted: ...' and 128 + the signal's number."""
  from vit_jax import run_log
  from vit_jax.checkpoints import WriteError
  from vit_jax.interrupt import TrainingInterruptedError

  run_log.PROCESS_ENDS_ON_FAILURE = True
  try:
    command()
  except (ValueError, FloatingPointError, OSError) as e:
    to_console(f"error: {e}")
    if isinstance(e, WriteError):
      # A failed write's threads may still report into a closed event loop, into the run's
      # log, where stderr stays diverted; nothing is left to save, so nothing waits for them.
      os._exit(2)
    sys.exit(2)
  except TrainingInterruptedError as e:
    to_console(f"interrupted: {e}")
    sys.exit(128 + e.signum)


def to_console(line: str) -> None:
  """`line` on the console's stderr, also where a failure left stderr in the run's log."""
  from vit_jax import run_log

  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(OSError):  # stderr may still go to the run's log, on a full disk
      stream.flush()
  os.write(run_log.console_fd(), f"{line}\n".encode())
