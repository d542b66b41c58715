"""Several seeds of one config trained as one: `jax.vmap` over their stacked train states.

Seeds of one configuration share every shape, so one compiled step can update them all
(`steps.compile_train_steps(..., seeds=True)`). Each seed keeps its own parameters, optimizer
state, data order, augmentation and dropout, drawn from (seed, step) exactly as its own run
(`train.train_and_evaluate`) draws them, so the results are a separate run's up to float
rounding (a test holds them to it).

Each seed has a workdir of its own, like a separate run's: config.json (with its seed),
metrics.jsonl, TensorBoard events and the final checkpoint, so that evaluation, the
pictures, the analysis and the sweep's report read it as any other run. The stacked state
is checkpointed in the group's workdir, so an interrupted group resumes where it stopped.

Layer 4 of vit_jax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from vit_jax import auto, distillation, input_pipeline
from vit_jax.checkpoints import Checkpoints
from vit_jax.experiment_config import ExperimentConfig, validate
from vit_jax.files import write_text_atomically
from vit_jax.instruments import effective_ranks
from vit_jax.loop import step_through
from vit_jax.metrics import MetricsWindow, MetricWriter, Progress
from vit_jax.parallel import Runner, choose_mode
from vit_jax.run_log import logging_to
from vit_jax.steps import compile_train_steps, microbatches_per_step
from vit_jax.train import (
  Data,
  attention_probe,
  evaluators,
  load_data,
  restore_or_start,
  short_warmup_line,
  total_train_steps,
  writes_checked,
)
from vit_jax.train_state import create_train_state, evaluation_params, learning_rate_schedule
from vit_jax.workdir import locked_workdir, saved_config, write_or_check_config


def stack(trees: Sequence[Any]) -> Any:
  """Trees of one structure -> one tree whose arrays gain a leading axis (the first tree's
  static fields, e.g. a TrainState's optimizer, serve them all)."""
  leaves = [jax.tree_util.tree_leaves(t) for t in trees]
  return jax.tree_util.tree_structure(trees[0]).unflatten(
      [np.stack([np.asarray(x) for x in xs]) for xs in zip(*leaves, strict=True)])


def unstack(tree: Any, index: int) -> Any:
  """The `index`-th tree of a stacked one."""
  return jax.tree_util.tree_map(lambda x: x[index], tree)


def train_and_evaluate_seeds(config: Any, seeds: Sequence[int], workdir: str | Path,
                             seed_workdirs: Sequence[str | Path], data: Data | None = None
                             ) -> list[dict[str, float]]:
  """Trains `config` once per seed in `seeds`, all in one compiled step.

  Args:
    config: as `train.train_and_evaluate` takes it; its own `seed` is replaced by each of
      `seeds`.
    workdir: the group's: its config.json and the stacked state's checkpoints.
    seed_workdirs: one per seed, each laid out as a separate run's workdir.
    data: as `train.train_and_evaluate` takes it (loaded from `config` if None).

  Returns:
    Each seed's final metrics, as `train.train_and_evaluate` returns them.
  """
  config = validate(config)
  if len(set(seeds)) != len(seeds) or len(seeds) != len(seed_workdirs) or not seeds:
    raise ValueError(f"seeds={list(seeds)} must be distinct, at least one, and one per "
                     f"seed workdir ({len(seed_workdirs)} given)")
  if config.init_from is not None:  # the stacked states start from `seed` only
    raise ValueError(f"config.init_from={config.init_from!r} is not available for seeds "
                     "trained as one step; train them as separate runs")
  runner = Runner(choose_mode(config.parallel))
  microbatches_per_step(config, runner)  # batches the devices cannot share fail here
  with contextlib.ExitStack() as held:
    workdir = held.enter_context(locked_workdir(workdir))
    _check_seeds(workdir, list(seeds))
    # Each seed's workdir too: the group writes its logs and final checkpoint, and a
    # `launch.py` run there meanwhile would write over them.
    dirs = [held.enter_context(locked_workdir(folder)) for folder in seed_workdirs]
    held.enter_context(logging_to(workdir))
    config, choices = auto.resolve(config, runner.num_devices, saved_config(workdir))
    configs = [dataclasses.replace(config, seed=s) for s in seeds]
    for folder, folder_config in zip([workdir, *dirs], [configs[0], *configs], strict=True):
      write_or_check_config(folder, folder_config, write=False)  # written once restored
    group = _Group(configs, workdir, dirs, runner, data if data is not None else load_data(config))
    with contextlib.closing(group):
      return group.train(f"running {len(seeds)} seeds as one on {choices}")


SEEDS_FILE = "seeds.json"  # a group's seeds, in the order of its stacked state


def _check_seeds(workdir: Path, seeds: list[int]) -> None:
  """Refuses another seed list than the group's: each slot of its stacked state is one seed's,
  and would go on under another seed's name and data order."""
  path = workdir / SEEDS_FILE
  if path.exists() and (recorded := json.loads(path.read_text())) != seeds:
    raise ValueError(f"seeds={seeds} are not the group's {recorded} (workdir={str(workdir)!r}); "
                     "resume it with those, or train these in a new group workdir")


def _seed_metrics(metrics: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
  """One seed's metrics of a call, (steps per call,), from all seeds' (steps per call, seeds)."""
  return {k: v[:, index] for k, v in metrics.items()}


class _Group:
  """The seeds' stacked state, their data orders, evaluators and per-seed logs."""

  def __init__(self, configs: list[ExperimentConfig], workdir: Path, dirs: list[Path],
               runner: Runner, data: Data):
    self.configs, self.dirs, self.runner, self.config = configs, dirs, runner, configs[0]
    self.workdir = workdir
    num_train = len(data["train"]["label"])
    distillation.check_teacher(self.config, data["train"])
    self.total_steps = total_train_steps(self.config, num_train)
    self.orders = [input_pipeline.EpochOrder(num_train, c.batch_size, c.seed) for c in configs]
    self.key = np.stack([np.asarray(jax.random.PRNGKey(c.seed)) for c in configs])
    self.checkpoints = Checkpoints(workdir, self.config.checkpoint_every_steps,
                                   self.config.keep_checkpoints)
    self.train_data = runner.replicate(data["train"])
    self.evaluators = evaluators(self.config, runner, data)
    self.attention_probe = attention_probe(self.config, data)
    self.watched = "validation" if "validation" in self.evaluators else "eval"
    self.writers = [MetricWriter(d) for d in dirs]
    self.quiet = Progress(self.total_steps, 0, enabled=False)
    self.windows = [MetricsWindow(lambda m, i=i: _seed_metrics(runner.unreplicate(m), i), writer,
                                  self.quiet, self.config.batch_size,
                                  learning_rate_schedule(self.config, self.total_steps),
                                  label=f" of seed {c.seed}")
                    for i, (writer, c) in enumerate(zip(self.writers, configs, strict=True))]

  def close(self) -> None:
    for writer in self.writers:
      writer.close()
    self.checkpoints.close()

  def _restore(self) -> Any:
    fresh = stack([create_train_state(c, self.total_steps) for c in self.configs])
    return restore_or_start(self.checkpoints, fresh, self.config, self.total_steps)

  def _seed_states(self, device_states: Any) -> list[Any]:
    """Each seed's state on the host, from one copy of the stack."""
    host = self.runner.unreplicate(device_states)
    return [unstack(host, i) for i in range(len(self.configs))]

  def evaluate(self, step: int, device_states: Any, prefixes: tuple[str, ...]
               ) -> list[dict[str, float]]:
    """Each seed's loss and accuracy on the splits of `prefixes`, written to its metrics."""
    results = []
    for window, writer, seed_state in zip(self.windows, self.writers,
                                          self._seed_states(device_states), strict=True):
      window.flush(step)
      state = self.runner.replicate(seed_state)
      result = {}
      for prefix in prefixes:
        metrics = self.evaluators[prefix](state)
        result.update({k.replace("eval_", f"{prefix}_"): v for k, v in metrics.items()})
      writer.write(step, {**result, **self.attention_probe(seed_state)})  # as a run logs
      results.append(result)
    for window in self.windows:
      window.restart_clock()
    return results

  def save(self, step: int, device_states: Any, force: bool = False) -> None:
    due = force or step % self.config.checkpoint_every_steps == 0
    if due and self.checkpoints.latest_step() != step:
      for window in self.windows:
        window.flush(step)  # raises on a non-finite loss before anything is written
      if self.checkpoints.save(step, self.runner.unreplicate(device_states), force=force):
        for writer, seed_state in zip(self.writers, self._seed_states(device_states),
                                      strict=True):  # as a run logs at its checkpoints
          writer.write(step, effective_ranks(evaluation_params(seed_state), self.config.model))

  def train(self, first_line: str) -> list[dict[str, float]]:
    states = self._restore()
    start = self.step = int(np.asarray(states.step).reshape(-1)[0])
    for folder, config in zip([self.workdir, *self.dirs], [self.config, *self.configs],
                              strict=True):
      write_or_check_config(folder, config, write=start < self.total_steps)  # as a run
    # Recorded once every check passed: a refused call must not name the group's seeds.
    write_text_atomically(self.workdir / SEEDS_FILE,
                          json.dumps([c.seed for c in self.configs]) + "\n")
    for writer in self.writers:
      writer.resume_at(start, self.total_steps)
    self.progress = progress = Progress(self.total_steps, start)
    try:
      resuming = f"resuming {self.workdir} at step {start}" if start else None
      for line in (first_line, short_warmup_line(self.config, self.total_steps), resuming):
        if line:
          progress.message(line)
      with writes_checked(lambda: self.step, self.checkpoints):
        step_fn = compile_train_steps(self.config, self.runner, seeds=True,
                                     total_steps=self.total_steps)
        device_states = step_through(self, step_fn, self.runner.replicate(states), start)
        results = self.evaluate(self.total_steps, device_states, tuple(self.evaluators))
    finally:
      progress.close()
    finals = []
    for seed_dir, result, window, seed_state in zip(
        self.dirs, results, self.windows, self._seed_states(device_states), strict=True):
      seed_checkpoints = Checkpoints(seed_dir)
      with contextlib.closing(seed_checkpoints):
        if seed_checkpoints.latest_step() != self.total_steps:
          seed_checkpoints.save(self.total_steps, seed_state, force=True)
      finals.append({**window.last, **result, "step": self.total_steps})
    accuracies = ", ".join(f"{f['eval_accuracy']:.4f}" for f in finals)
    progress.message(f"final test accuracy per seed {accuracies} at step {self.total_steps}")
    return finals

  # The hooks of `loop.step_through`, for every seed at once.
  def indices(self, step: int) -> np.ndarray:
    return np.stack([order.indices(step) for order in self.orders], axis=1)

  def add(self, first: int, count: int, metrics: Any) -> None:
    for window in self.windows:
      window.add(first, count, metrics)

  def evaluate_watched(self, step: int, device_states: Any) -> str:
    key = f"{self.watched}_accuracy"
    results = self.evaluate(step, device_states, (self.watched,))
    return f"step {step}: {key} per seed " + ", ".join(f"{r[key]:.4f}" for r in results)

  def log(self, step: int) -> None:
    """Every seed's window written; the progress line shows their means, and images/s of
    all seeds together."""
    progress = self.progress
    pending = any(window.pending for window in self.windows)
    for window in self.windows:
      window.flush(step)
    lasts = [w.last for w in self.windows if w.last]
    if pending and lasts:
      progress.update(step, {
          "train_loss": float(np.mean([m["train_loss"] for m in lasts])),
          "train_accuracy": float(np.mean([m["train_accuracy"] for m in lasts])),
          "images_per_sec": float(np.sum([m["images_per_sec"] for m in lasts]))})
