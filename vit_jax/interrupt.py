"""Stopping a run on SIGTERM or Ctrl-C, after a checkpoint.

Imports no JAX at module level, so that `launch.py` can name the error before JAX
is configured.
"""

from __future__ import annotations

import contextlib
import signal


class StopSignal:
  """Turns SIGTERM / SIGINT into a flag the loop checks between its calls of the steps."""

  def __init__(self):
    self.received: int | None = None
    self.previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        self.previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signum

  def should_stop(self, step: int, every_steps: int) -> bool:
    """Whether to checkpoint and stop after `step`.

    One process stops at once. Several must stop at the same step (checkpoints are
    collective), so they agree at checkpoint steps, where any signalled one stops all.
    """
    import jax

    if jax.process_count() == 1:
      return self.received is not None
    if step % every_steps:
      return False
    from vit_jax.parallel import gathered

    self.received = self.received or int(gathered([self.received or 0]).max()) or None
    return self.received is not None

  def __exit__(self, *exc):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)


class TrainingInterruptedError(Exception):
  """Raised after a SIGTERM / SIGINT once the state is checkpointed."""

  def __init__(self, signum: int, step: int):
    super().__init__(f"stopped by signal {signum} at step {step}; "
                     "rerun the same command to resume")
    self.signum, self.step = signum, step
