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
from vit_jax.steps import call_indices
from vit_jax.training_images import undistorted_line


class Hooks(Protocol):
  """What `step_through` asks of a run."""

  config: ExperimentConfig
  runner: Runner
  total_steps: int
  train_data: Any  # on the devices
  progress: Progress
  step: int  # the last step taken, set by the loop, for errors

  key: Any  # the run's key, or the seeds' keys, that each step folds with its own number

  def indices(self, step: int) -> np.ndarray:
    """The batch's example indices (B, ...) of step `step`, from 0, on the host."""

  def add(self, first: int, count: int, metrics: Any) -> None:
    """Takes the training metrics of the `count` steps after step `first` (a leading axis of
    `config.steps_per_call`), still on the devices."""

  def log(self, step: int) -> None:
    """Writes the metrics taken since the last log."""

  def save(self, step: int, device_state: Any, force: bool = False) -> None:
    """Checkpoints the state if due at `step` (or `force`)."""

  def evaluate_watched(self, step: int, device_state: Any) -> str:
    """Evaluates the watched split, logs it; -> the line to show."""


def step_through(run: Hooks, step_fn: Callable, device_state: Any, start_step: int) -> Any:
  """Runs `run`'s training steps from `start_step` to its last, up to
  `config.steps_per_call` a call (`steps.compile_train_steps`), logging, evaluating and saving
  on the way; -> the final device state. On SIGTERM or Ctrl-C, saves and raises
  TrainingInterruptedError."""
  config, total = run.config, run.total_steps
  positions = run.runner.split_batch(np.arange(config.batch_size, dtype=np.int32))
  done = start_step
  with StopSignal() as stop:
    while done < total:
      count = next_event(config, total, done) - done
      for step in range(done, done + count):
        if line := undistorted_line(config, total, step, start_step):
          run.progress.message(line)
      indices = call_indices(run.indices, done, count, config.steps_per_call)
      device_state, metrics = step_fn(device_state, run.train_data,
                                      run.runner.split_batch(indices), positions, run.key,
                                      np.int32(count))
      run.add(done, count, metrics)
      done = run.step = done + count
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


def next_event(config: ExperimentConfig, total_steps: int, done: int) -> int:
  """Where the call after `done` steps ends: `config.steps_per_call` steps on, or before
  that the next step at which the run logs, checkpoints or evaluates, or its last."""
  every = [config.log_every_steps, config.checkpoint_every_steps, config.eval_every_steps]
  due = [(done // n + 1) * n for n in every if n]
  return min(done + config.steps_per_call, total_steps, *due)
