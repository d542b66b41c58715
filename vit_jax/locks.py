"""One process at a time in a workdir: an flock the kernel releases however the holder dies.

Layer 4 of vit_jax.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path


class WorkdirBusyError(ValueError):
  """Another process holds the lock: one line, naming it."""


class WorkdirLock:
  """An exclusive lock on a workdir for the life of one run.

  It is an flock on `workdir/lock`: the kernel releases it when the process dies,
  however it dies, so a killed run never leaves the workdir locked.
  """

  def __init__(self, workdir: Path, name: str = "lock"):
    """`name`: the lock's file in `workdir`; locks of other names are independent."""
    self.path = Path(workdir) / name
    self.file = None

  def __enter__(self):
    self.file = open(self.path, "a+")  # noqa: SIM115 - held until __exit__
    try:
      fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self.file.seek(0)
      holder = self.file.read().strip() or "another process"
      self.file.close()
      raise WorkdirBusyError(f"workdir={str(self.path.parent)!r} is in use by {holder}; "
                             "wait for it or use another workdir") from None
    self.file.seek(0)
    self.file.truncate()
    self.file.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    self.file.flush()
    return self

  def __exit__(self, *exc):
    fcntl.flock(self.file, fcntl.LOCK_UN)
    self.file.close()
