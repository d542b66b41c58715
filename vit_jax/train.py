"""Training: `train_and_evaluate(config, workdir)`, the loop around the pure steps.

`train_and_evaluate(config, workdir)` is all `launch.py` calls to train. The steps
(`vit_jax.steps`) are pure functions of (state, batch, rng); the data order and every
random number derive from (seed, step), so a run resumed from a checkpoint takes the same
path as one that never stopped.

Layer 4 of vit_jax.
"""

from __future__ import annotations

import contextlib
import errno
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from vit_jax import (
  analysis,
  auto,
  distillation,
  inference,
  init_from,
  input_pipeline,
  instruments,
  mnist_source,
)
from vit_jax.checkpoints import Checkpoints, WriteError
from vit_jax.evaluation import Evaluator
from vit_jax.experiment_config import ExperimentConfig, validate
from vit_jax.loop import step_through
from vit_jax.metrics import MetricsWindow, MetricWriter, Progress
from vit_jax.models import ViT
from vit_jax.parallel import Runner, choose_mode
from vit_jax.run_log import logging_to, stderr_into_log
from vit_jax.steps import compile_train_steps, microbatches_per_step
from vit_jax.train_state import (
  TrainState,
  create_train_state,
  evaluation_params,
  learning_rate_schedule,
  per_array_moments,
)
from vit_jax.workdir import CONFIG_FILE, locked_workdir, saved_config, write_or_check_config

PROBE_IMAGES = 256  # held-out images whose attention statistics every evaluation logs
Data = dict[str, dict[str, np.ndarray]]  # {'train' | 'validation' | 'test': {'image', 'label'}}


def load_data(config: ExperimentConfig) -> Data:
  """{'train', 'test'} host arrays, and 'validation' held out of the training split when
  `config.validation_examples`; train then cut to `config.train_examples`. With
  `config.distill_targets`, train has 'teacher' (N, K) probabilities too."""
  out = {}
  for split in ("train", "test"):
    images, labels = mnist_source.load_split(config.dataset, split, config.tfds_data_dir,
                                             config.idx_dir)
    out[split] = {"image": images, "label": labels}
  if config.distill_targets is not None:  # before the hold-out: the file follows the dataset
    out["train"]["teacher"] = distillation.load_targets(
        config.distill_targets, config.dataset, out["train"]["image"], out["train"]["label"],
        config.model.num_classes, config.validation_examples)
  if config.validation_examples:
    out["train"], out["validation"] = input_pipeline.hold_out(out["train"],
                                                              config.validation_examples)
    out["validation"].pop("teacher", None)  # validation is scored against its labels alone
  if config.train_examples is not None:
    out["train"] = {k: v[:config.train_examples] for k, v in out["train"].items()}
  return out


def evaluators(config: ExperimentConfig, runner: Runner, data: Data) -> dict[str, Evaluator]:
  """{'validation': ..., 'eval': ...}: an Evaluator of each held-out split in `data` (the
  test split, and validation where held out), named as the metrics they write."""
  return {prefix: inference.split_evaluator(config, runner, data[split])
          for split, prefix in (("validation", "validation"), ("test", "eval"))
          if split in data}


def total_train_steps(config: ExperimentConfig, num_train_examples: int) -> int:
  steps_per_epoch = num_train_examples // config.batch_size
  # Rounded first: 1.1 epochs of 100 steps is 110.00000000000001 in floats, not 111 steps.
  return max(1, math.ceil(round(config.num_epochs * steps_per_epoch, 6)))


def short_warmup_line(config: ExperimentConfig, total_steps: int) -> str | None:
  """What a run says where its warm-up is not shorter than the run: cut, with no decay."""
  if config.warmup_steps < total_steps:
    return None
  return (f"config.warmup_steps={config.warmup_steps} is not below the run's {total_steps} "
          f"steps: warm-up cut to {max(total_steps - 1, 0)}, the learning rate never decays")


def train_and_evaluate(config: Any, workdir: str | Path, data: Data | None = None
                       ) -> dict[str, float]:
  """Trains (resuming from `workdir` if it holds checkpoints), evaluates, returns metrics.

  Args:
    config: an ExperimentConfig, or a ConfigDict / mapping validated into one.
    workdir: checkpoints, config.json, metrics.jsonl and TensorBoard events go here.
    data: arrays as `load_data` returns them (loaded from `config` if None); given, they are
      taken as they are: `config`'s dataset, train_examples and validation_examples do not
      load or cut them (the dataset still chooses the normalisation).

  Returns:
    The final metrics: eval_loss, eval_accuracy, step, and training throughput.
  """
  config = validate(config)
  runner = Runner(choose_mode(config.parallel))
  microbatches_per_step(config, runner)  # batches the devices cannot share fail here
  if config.init_from:
    init_from.check_source(config)  # a source that cannot be mapped fails here
  main = runner.is_main_process  # with several processes, process 0 owns the workdir's files
  with locked_workdir(workdir, lock=main) as workdir, logging_to(workdir, enabled=main):
    config, choices = auto.resolve(config, runner.num_devices, saved_config(workdir))
    write_or_check_config(workdir, config, write=False)  # written once the state is restored
    with _Run(config, workdir, runner, data if data is not None else load_data(config)) as run:
      return run.train(f"running on {choices}")


def attention_probe(config: ExperimentConfig, data: Data) -> Callable[[Any], dict[str, float]]:
  """-> f(state): the attention statistics every evaluation logs (`instruments`), measured on
  the first PROBE_IMAGES held-out images: validation's where held out, else the test split's."""
  images = data["validation" if "validation" in data else "test"]["image"][:PROBE_IMAGES]
  forward = analysis.forward_with_attention(ViT(config.model).apply, config.dataset)
  return lambda state: instruments.attention_statistics(
      forward(evaluation_params(state), images)[1], config.model)


def restore_or_start(checkpoints: Checkpoints, fresh: Any, config: ExperimentConfig,
                     total_steps: int) -> Any:
  """The latest checkpoint, or `fresh`; refuses a workdir past the last step, where training
  would not run and the final state would be labelled as another schedule's."""
  restored = checkpoints.restore_latest(fresh, earlier=per_array_moments(fresh))
  if restored is None:
    return fresh
  step = int(np.max(restored.step))  # seeds trained as one share their step
  if step > total_steps:
    raise ValueError(f"config.num_epochs={config.num_epochs} makes {total_steps} steps, but "
                     f"workdir={str(checkpoints.directory.parent)!r} is already at step {step}")
  return restored


class _Run:
  """One run in a workdir that is ready and locked: its data, steps, checkpoints and logs."""

  def __init__(self, config: ExperimentConfig, workdir: Path, runner: Runner, data: Data):
    num_train = len(data["train"]["label"])
    if num_train < config.batch_size:  # data handed in directly skips the config's own check
      raise ValueError(f"config.batch_size={config.batch_size} exceeds the {num_train} "
                       "training examples")
    distillation.check_teacher(config, data["train"])
    self.config, self.workdir, self.runner = config, workdir, runner
    self.total_steps = total_train_steps(config, num_train)
    self.order = input_pipeline.EpochOrder(num_train, config.batch_size, config.seed)
    self.data = data  # on the host until the run is known to go ahead
    self.cleanup = contextlib.ExitStack()
    self.checkpoints = Checkpoints(workdir, config.checkpoint_every_steps,
                                   config.keep_checkpoints)
    self.cleanup.callback(self.checkpoints.close)

  def __enter__(self) -> _Run:
    return self

  def __exit__(self, *exc) -> None:
    self.cleanup.close()

  def _restore(self) -> TrainState:
    return restore_or_start(self.checkpoints, create_train_state(self.config, self.total_steps),
                            self.config, self.total_steps)

  def _open_logs(self, start_step: int) -> None:
    main = self.runner.is_main_process
    writer = MetricWriter(self.workdir, enabled=main)
    self.cleanup.callback(writer.close)
    writer.resume_at(start_step, self.total_steps)
    self.progress = Progress(self.total_steps, start_step, enabled=main)
    self.cleanup.callback(self.progress.close)
    self.window = MetricsWindow(self.runner.unreplicate, writer, self.progress,
                                self.config.batch_size,
                                learning_rate_schedule(self.config, self.total_steps))

  def save(self, step: int, device_state: Any, force: bool = False) -> None:
    """Checkpoints the state at `step` if due (or `force`), never one after a non-finite loss."""
    due = force or step % self.config.checkpoint_every_steps == 0
    if due and self.checkpoints.latest_step() != step:
      self.window.flush(step)  # raises on a non-finite loss before anything is written
      # A failed write's tracebacks go to the log (process 0 owns it).
      with stderr_into_log(self.workdir) if self.runner.is_main_process \
          else contextlib.nullcontext():
        state = self.runner.unreplicate(device_state)
        if self.checkpoints.save(step, state, force=force):
          # The projections' spectra at every checkpoint (`instruments.projection_spectra`).
          self.window.writer.write(step, instruments.effective_ranks(
              evaluation_params(state), self.config.model))

  def _put_data_on_devices(self) -> None:
    """The training split, and an Evaluator for the test split and the validation split (if
    one is held out), whose metrics are named eval_* and validation_*."""
    self.train_data = self.runner.replicate(self.data["train"])
    self.evaluators = evaluators(self.config, self.runner, self.data)
    # What training watches: the validation split where there is one, never both.
    self.watched = "validation" if "validation" in self.evaluators else "eval"
    self.attention_probe = attention_probe(self.config, self.data)

  def evaluate_and_log(self, step: int, device_state: Any, prefixes: tuple[str, ...]
                       ) -> dict[str, float]:
    """Loss and accuracy at `step` on the splits named by `prefixes` ('validation', 'eval':
    the test split), written to the metrics."""
    self.window.flush(step)
    result = {}
    for prefix in prefixes:
      metrics = self.evaluators[prefix](device_state)
      result.update({k.replace("eval_", f"{prefix}_"): v for k, v in metrics.items()})
    state = self.runner.unreplicate(device_state)
    self.window.writer.write(step, {**result, **self.attention_probe(state)})
    self.window.restart_clock()
    return result

  def train(self, first_line: str = "") -> dict[str, float]:
    """Steps from the latest checkpoint to the last step, then evaluates; the final metrics.

    `first_line` is shown before the steps. Raises TrainingInterruptedError after saving, on
    SIGTERM or Ctrl-C.
    """
    state = self._restore()
    start_step = self.step = int(state.step)
    # A finished run started again trains nothing: its config.json stays the one it ran with.
    finished = start_step >= self.total_steps
    changed = write_or_check_config(self.workdir, self.config,
                                    write=self.runner.is_main_process and not finished)
    unused = (f"the run is finished at step {start_step}: nothing is trained, so "
              f"{', '.join(changed)} change at most the evaluation, and {CONFIG_FILE} keeps "
              "the run's own") if finished and changed else None
    taken = None
    if not start_step and self.config.init_from:
      state, taken = init_from.initialised_from(state, self.config)
    self._put_data_on_devices()
    self._open_logs(start_step)
    for line in (first_line, taken, short_warmup_line(self.config, self.total_steps),
                 unused):
      if line:
        self.progress.message(line)
    if start_step:
      self.progress.message(f"resuming {self.workdir} at step {start_step}")
    with writes_checked(lambda: self.step, self.checkpoints):
      device_state = self._steps(self.runner.replicate(state), start_step)
      result = self.evaluate_and_log(self.total_steps, device_state, tuple(self.evaluators))
    self.progress.message(f"final test accuracy {result['eval_accuracy']:.4f} "
                          f"(loss {result['eval_loss']:.4f}) at step {self.total_steps}")
    return {**self.window.last, **result, "step": self.total_steps}

  def _steps(self, device_state: Any, start_step: int) -> Any:
    step_fn = compile_train_steps(self.config, self.runner, total_steps=self.total_steps)
    self.key = np.asarray(jax.random.PRNGKey(self.config.seed))  # each step folds in its own
    return step_through(self, step_fn, device_state, start_step)

  # The hooks of `loop.step_through`.
  def indices(self, step: int) -> np.ndarray:
    return self.order.indices(step)

  def add(self, first: int, count: int, metrics: Any) -> None:
    self.window.add(first, count, metrics)

  def log(self, step: int) -> None:
    self.window.flush(step)

  def evaluate_watched(self, step: int, device_state: Any) -> str:
    key = f"{self.watched}_accuracy"
    result = self.evaluate_and_log(step, device_state, (self.watched,))
    return f"step {step}: {key}={result[key]:.4f}"


@contextlib.contextmanager
def writes_checked(last_step: Callable[[], int], checkpoints: Checkpoints) -> Iterator[None]:
  """A full disk or a read-only filesystem under the metrics or logs: one line, not a
  traceback (the checkpoints say so themselves); `last_step()`: the last step taken."""
  try:
    yield
  except OSError as e:
    if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
      raise
    raise WriteError(f"{e.filename or 'a file of the run'} could not be written after step "
                     f"{last_step()} ({e.strerror.lower()}); "
                     f"{checkpoints.latest_description()}") from e
