"""The training loop: steps from a checkpoint to the last, logging, evaluating and saving.

One loop for a separate run (`train._Run`) and for seeds trained as one step
(`seeds._Group`): what differs between them (one data order or several, one metrics window
or one per seed) is in their hooks, `Hooks`.

Layer 4 of vit_jax.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from vit_jax.experiment_config import ExperimentConfig
from vit_jax.interrupt import StopSignal, TrainingInterruptedError
from vit_jax.metrics import Progress
from vit_jax.parallel import Runner
from vit_jax.training_images import undistorted_line


class Hooks(Protocol):
  """What `step_through` asks of a run."""

  config: ExperimentConfig
  runner: Runner
  total_steps: int
  train_data: Any  # on the devices
  progress: Progress
  step: int  # the last step taken, set by the loop, for errors

  def batch(self, step: int) -> tuple[Any, Any]:
    """(the batch's example indices on the devices, the rng) of step `step`, from 0."""

  def add(self, step: int, metrics: Any) -> None:
    """Takes the training metrics of the step that made `step` steps."""

  def log(self, step: int) -> None:
    """Writes the metrics taken since the last log."""

  def save(self, step: int, device_state: Any, force: bool = False) -> None:
    """Checkpoints the state if due at `step` (or `force`)."""

  def evaluate_watched(self, step: int, device_state: Any) -> str:
    """Evaluates the watched split, logs it; -> the line to show."""


def step_through(run: Hooks, step_fn: Callable, device_state: Any, start_step: int) -> Any:
  """Runs `run`'s training steps from `start_step` to its last, logging, evaluating and
  saving on the way; -> the final device state. On SIGTERM or Ctrl-C, saves and raises
  TrainingInterruptedError."""
  config, total = run.config, run.total_steps
  positions = run.runner.split_batch(np.arange(config.batch_size, dtype=np.int32))
  with StopSignal() as stop:
    for done in range(start_step + 1, total + 1):
      run.step = done - 1
      if line := undistorted_line(config, total, done - 1, start_step):
        run.progress.message(line)
      indices, rng = run.batch(done - 1)
      device_state, metrics = step_fn(device_state, run.train_data, indices, positions, rng)
      run.add(done, metrics)
      if done % config.log_every_steps == 0:
        run.log(done)
      run.save(done, device_state)
      if config.eval_every_steps and done % config.eval_every_steps == 0 and done < total:
        run.progress.message(run.evaluate_watched(done, device_state))
      if run.progress.console_closed:  # a pipe's reader left (`| head`): stop as if signalled
        stop.received = stop.received or signal.SIGPIPE
      if stop.should_stop(done, config.checkpoint_every_steps):
        run.save(done, device_state, force=True)
        raise TrainingInterruptedError(stop.received, done)
    run.log(total)
    run.save(total, device_state, force=True)
  return device_state
