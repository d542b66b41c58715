"""Training and evaluation: state, optimizer, the pure steps, and the loop around them.

`train_and_evaluate(config, workdir)` is all `launch.py` calls to train. The steps
are pure functions of (state, batch, rng); the data order and every random number
derive from (seed, step), so a run resumed from a checkpoint takes the same path
as one that never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.flatten_util import ravel_pytree

from vit_jax import input_pipeline, mnist_source
from vit_jax.checkpoints import (
    Checkpoints,
    WorkdirLock,
    prepare_workdir,
    write_or_check_config,
)
from vit_jax.experiment_config import ExperimentConfig, validate
from vit_jax.interrupt import StopSignal, TrainingInterruptedError
from vit_jax.metrics import MetricWriter, Progress
from vit_jax.models import ViT
from vit_jax.parallel import Runner, choose_mode

TrainState = train_state.TrainState


# --- State and optimizer ---------------------------------------------------------------

def learning_rate_schedule(config: ExperimentConfig, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0, then cosine decay to 0 at `total_steps`."""
  warmup = min(config.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=0.0)


def create_train_state(config: ExperimentConfig, total_steps: int) -> TrainState:
  """Fresh parameters from `config.seed` and an AdamW optimizer with clipping."""
  model = ViT(config.model)
  c = config.model
  dummy = jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(config.seed), dummy)["params"]
  tx = optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm),
      optax.adamw(learning_rate_schedule(config, total_steps),
                  weight_decay=config.weight_decay))
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


# --- The steps -------------------------------------------------------------------------

def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example cross-entropy, (B, K) logits and (B,) int labels -> (B,)."""
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def split_microbatches(batch: dict[str, jax.Array], num_microbatches: int
                       ) -> dict[str, jax.Array]:
  """(B, ...) arrays -> (k, B/k, ...): pass j holds examples j, j + k, j + 2k, ...

  Strided, not contiguous, so that under 'shard' (the batch's rows split over the devices)
  every pass still spreads over all devices.
  """
  def split(x):
    if x.shape[0] % num_microbatches:
      raise ValueError(f"{num_microbatches} micro-batches do not divide a batch of "
                       f"{x.shape[0]}")
    passes = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:])
    return passes.swapaxes(0, 1)

  return jax.tree_util.tree_map(split, batch)


def mean_over_devices(tree: Any, axis_name: str) -> Any:
  """`lax.pmean` of every (float) leaf of `tree`, sent as one flat buffer.

  XLA's CPU runtime synchronises the devices once per array of an all-reduce: 76 times a
  step for the `seed` ViT's gradients and metrics, which cost about 5 ms of a 110 ms step
  on two CPU devices (docs/performance.md). One buffer synchronises them once; the means
  are the same.
  """
  flat, unflatten = ravel_pytree(tree)
  return unflatten(jax.lax.pmean(flat, axis_name))


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               label_smoothing: float = 0.0, num_microbatches: int = 1,
               axis_name: str | None = None):
  """One AdamW update on `batch` = {'image': (B, H, W, C) float, 'label': (B,) int}.

  The batch goes through the model in `num_microbatches` passes of B / num_microbatches
  examples (`lax.scan`), their gradients summed: the update of one pass over the whole
  batch, up to float rounding (and dropout's draws), with one pass's activations in memory
  at a time.
  Under pmap (`axis_name` set) gradients and metrics are averaged across devices,
  so each device must hold the same number of examples.

  Returns:
    (new state, {'loss', 'accuracy'} of this batch, before the update).
  """
  def sums(params, micro, rng):
    logits = state.apply_fn({"params": params}, micro["image"], train=True,
                            rngs={"dropout": rng})
    correct = jnp.sum(jnp.argmax(logits, -1) == micro["label"]).astype(jnp.int32)
    return jnp.sum(cross_entropy(logits, micro["label"], label_smoothing)), correct

  def accumulate(totals, one_pass):
    index, micro = one_pass
    # Each pass draws its own dropout masks; a single pass draws the step's own.
    pass_rng = rng if num_microbatches == 1 else jax.random.fold_in(rng, index)
    (loss, correct), grads = jax.value_and_grad(sums, has_aux=True)(
        state.params, micro, pass_rng)
    return jax.tree_util.tree_map(jnp.add, totals, (loss, correct, grads)), None

  zeros = (jnp.zeros(()), jnp.zeros((), jnp.int32),
           jax.tree_util.tree_map(jnp.zeros_like, state.params))
  passes = (jnp.arange(num_microbatches), split_microbatches(batch, num_microbatches))
  (loss, correct, grads), _ = jax.lax.scan(accumulate, zeros, passes)
  num_examples = batch["label"].shape[0]
  grads = jax.tree_util.tree_map(lambda g: g / num_examples, grads)
  metrics = {"loss": loss / num_examples, "accuracy": correct / num_examples}
  if axis_name is not None:
    grads, metrics = mean_over_devices((grads, metrics), axis_name)
  return state.apply_gradients(grads=grads), metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, axis_name: str | None = None):
  """Sums over the examples of `batch` whose 'mask' is True: loss, correct, count.

  `batch`: 'image' float32 (B, H, W, C) normalised, 'label' int32 (B,), 'mask' bool (B,).
  Returns three float32 scalars, summed over the devices of `axis_name` if given.
  """
  logits = state.apply_fn({"params": state.params}, batch["image"], train=False)
  mask = batch["mask"].astype(jnp.float32)
  sums = {"loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
          "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
          "count": jnp.sum(mask)}
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums


# --- The steps on device-resident data --------------------------------------------------

def _train_on_indices(state, data, indices, positions, rng, *, config: ExperimentConfig,
                      num_microbatches: int, axis_name):
  """Gathers, augments and normalises a batch on device, then `train_step`."""
  spec = mnist_source.dataset_spec(config.dataset)
  augment_rng, dropout_rng = jax.random.split(rng)
  images = input_pipeline.random_translate(
      data["image"][indices], input_pipeline.example_keys(augment_rng, positions),
      config.augment_max_shift)
  batch = {"image": input_pipeline.normalize(images, spec.mean, spec.std),
           "label": data["label"][indices]}
  if axis_name is not None:
    dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))
  return train_step(state, batch, dropout_rng, label_smoothing=config.label_smoothing,
                    num_microbatches=num_microbatches, axis_name=axis_name)


def passes_per_step(config: ExperimentConfig, runner: Runner) -> int:
  """Micro-batch passes per training step, after checking that the devices share both batches.

  Raises a one-line ValueError naming the config field that they cannot share.
  """
  runner.check_batch_size("batch_size", config.batch_size)
  runner.check_batch_size("eval_batch_size", config.eval_batch_size)
  return runner.num_microbatches(config.batch_size, config.microbatch_size)


def compile_train_step(config: ExperimentConfig, runner: Runner):
  """`_train_on_indices` for `runner`: (state, data, indices, positions, rng) -> (state, metrics).

  The state's buffers are donated: the caller keeps only the returned state.
  """
  step = functools.partial(
      _train_on_indices, config=config,
      num_microbatches=passes_per_step(config, runner))
  return runner.compile(step, in_axes=(0, 0, 0, 0, None), donate_argnums=(0,))


def _eval_on_indices(state, data, indices, mask, *, dataset: str, axis_name):
  spec = mnist_source.dataset_spec(dataset)
  batch = {"image": input_pipeline.normalize(data["image"][indices], spec.mean, spec.std),
           "label": data["label"][indices], "mask": mask}
  return eval_step(state, batch, axis_name=axis_name)


@dataclasses.dataclass
class Evaluator:
  """Evaluates a state over a whole split, every example exactly once."""
  runner: Runner
  data: Any  # on device(s): {'image': uint8 (N, H, W, C), 'label': int32 (N,)}
  num_examples: int
  batch_size: int
  dataset: str

  def __post_init__(self):
    self.step = self.runner.compile(
        functools.partial(_eval_on_indices, dataset=self.dataset), in_axes=(0, 0, 0, 0))

  def __call__(self, state) -> dict[str, float]:
    totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for indices, mask in input_pipeline.eval_indices(self.num_examples, self.batch_size):
      # Each batch finished on every device (not only the first, whose sums are read) before
      # the next is dispatched: with several batches in flight (each has an all-reduce),
      # XLA's CPU devices waited on each other until XLA aborted the process (a two-device
      # run; reproduced with eight, tests/test_train.py).
      sums = jax.block_until_ready(self.step(state, self.data, self.runner.split_batch(indices),
                                             self.runner.split_batch(mask)))
      sums = self.runner.unreplicate(sums)
      for k in totals:
        totals[k] += float(sums[k])
    assert int(totals["count"]) == self.num_examples, totals
    return {"eval_loss": totals["loss"] / totals["count"],
            "eval_accuracy": totals["correct"] / totals["count"]}


# --- The loop --------------------------------------------------------------------------

def load_data(config: ExperimentConfig) -> dict[str, dict[str, np.ndarray]]:
  """{'train': {...}, 'test': {...}} host arrays, train cut to `config.train_examples`."""
  out = {}
  for split in ("train", "test"):
    images, labels = mnist_source.load_split(config.dataset, split, config.tfds_data_dir,
                                             config.idx_dir)
    if split == "train" and config.train_examples is not None:
      images, labels = images[:config.train_examples], labels[:config.train_examples]
    out[split] = {"image": images, "label": labels}
  return out


def total_train_steps(config: ExperimentConfig, num_train_examples: int) -> int:
  steps_per_epoch = num_train_examples // config.batch_size
  return max(1, math.ceil(config.num_epochs * steps_per_epoch))


def train_and_evaluate(config: Any, workdir: str | Path,
                       data: dict[str, dict[str, np.ndarray]] | None = None) -> dict[str, float]:
  """Trains (resuming from `workdir` if it holds checkpoints), evaluates, returns metrics.

  Args:
    config: an ExperimentConfig, or a ConfigDict / mapping validated into one.
    workdir: checkpoints, config.json, metrics.jsonl and TensorBoard events go here.
    data: arrays as `load_data` returns them (loaded from `config` if None).

  Returns:
    The final metrics: eval_loss, eval_accuracy, step, and training throughput.
  """
  config = validate(config)
  runner = Runner(choose_mode(config.parallel))
  passes_per_step(config, runner)  # batches the devices cannot share are refused here
  workdir = prepare_workdir(workdir)
  main = runner.is_main_process  # with several processes, process 0 owns the workdir's files
  with WorkdirLock(workdir) if main else contextlib.nullcontext():
    write_or_check_config(workdir, config, write=main)
    return _train(config, workdir, runner, data if data is not None else load_data(config))


def _train(config: ExperimentConfig, workdir: Path, runner: Runner,
           data: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
  """The loop of `train_and_evaluate`, in a workdir that is ready and locked."""
  num_train = len(data["train"]["label"])
  if num_train < config.batch_size:  # data handed in directly skips the config's own check
    raise ValueError(f"config.batch_size={config.batch_size} exceeds the {num_train} "
                     "training examples")
  order = input_pipeline.EpochOrder(num_train, config.batch_size, config.seed)
  total_steps = total_train_steps(config, num_train)

  with contextlib.ExitStack() as cleanup:
    checkpoints = Checkpoints(workdir, config.checkpoint_every_steps, config.keep_checkpoints)
    cleanup.callback(checkpoints.close)
    return _train_loop(config, workdir, runner, data, order, total_steps, checkpoints, cleanup)


def _train_loop(config, workdir, runner, data, order, total_steps, checkpoints, cleanup):
  state = create_train_state(config, total_steps)
  restored = checkpoints.restore_latest(state)
  state = restored if restored is not None else state
  start_step = int(state.step)
  if start_step > total_steps:
    raise ValueError(f"config.num_epochs={config.num_epochs} makes {total_steps} steps, but "
                     f"workdir={str(workdir)!r} is already at step {start_step}")

  schedule = learning_rate_schedule(config, total_steps)
  train_data = runner.replicate(data["train"])
  evaluate = Evaluator(runner, runner.replicate(data["test"]), len(data["test"]["label"]),
                       config.eval_batch_size, config.dataset)
  step_fn = compile_train_step(config, runner)
  base_rng = jax.random.PRNGKey(config.seed)
  positions = runner.split_batch(np.arange(config.batch_size, dtype=np.int32))
  device_state = runner.replicate(state)

  writer = MetricWriter(workdir, enabled=runner.is_main_process)
  cleanup.callback(writer.close)
  progress = Progress(total_steps, start_step, enabled=runner.is_main_process)
  cleanup.callback(progress.close)
  if restored is not None:
    progress.message(f"resuming {workdir} at step {start_step}")
  pending: list[tuple[int, Any]] = []  # per-step metrics not yet fetched from the device
  window_start, window_steps = time.monotonic(), 0
  final: dict[str, float] = {"step": start_step}

  def flush_metrics(step: int) -> None:
    """Fetches pending metrics, stops on a non-finite loss, logs their means."""
    nonlocal window_start, window_steps, pending
    if not pending:
      return
    fetched = [(s, runner.unreplicate(m)) for s, m in pending]
    pending = []
    for s, m in fetched:
      loss = m["loss"]
      if not np.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss} at step {s}; no checkpoint of a "
                                 "non-finite state was saved")
    elapsed = time.monotonic() - window_start
    means = {f"train_{k}": float(np.mean([np.mean(m[k]) for _, m in fetched]))
             for k in fetched[0][1]}
    means["learning_rate"] = float(schedule(step - 1))
    means["images_per_sec"] = window_steps * config.batch_size / max(elapsed, 1e-9)
    writer.write(step, means)
    progress.update(step, means)
    final.update(means)
    window_start, window_steps = time.monotonic(), 0

  def save(step: int, force: bool = False) -> None:
    due = force or step % config.checkpoint_every_steps == 0
    if due and checkpoints.latest_step() != step:
      flush_metrics(step)  # never checkpoint a state whose loss went non-finite
      checkpoints.save(step, runner.unreplicate(device_state), force=force)

  with StopSignal() as stop:
    for step in range(start_step, total_steps):
      rng = jax.random.fold_in(base_rng, step)
      indices = runner.split_batch(order.indices(step))
      device_state, metrics = step_fn(device_state, train_data, indices, positions, rng)
      pending.append((step + 1, metrics))
      window_steps += 1
      done = step + 1
      if done % config.log_every_steps == 0:
        flush_metrics(done)
      save(done)
      if config.eval_every_steps and done % config.eval_every_steps == 0 and done < total_steps:
        flush_metrics(done)
        result = evaluate(device_state)
        writer.write(done, result)
        progress.message(f"step {done}: eval_accuracy={result['eval_accuracy']:.4f}")
        window_start = time.monotonic()
      if stop.should_stop(done, config.checkpoint_every_steps):
        save(done, force=True)
        raise TrainingInterruptedError(stop.received, done)
    flush_metrics(total_steps)
    save(total_steps, force=True)
  result = evaluate(device_state)
  writer.write(total_steps, result)
  final.update(result, step=total_steps)
  progress.message(f"final test accuracy {result['eval_accuracy']:.4f} "
                   f"(loss {result['eval_loss']:.4f}) at step {total_steps}")
  return final


def restore_state(config: Any, workdir: str | Path) -> TrainState:
  """The latest readable checkpoint of `workdir`; a clear error if there is none."""
  config = validate(config)
  workdir = Path(workdir)
  write_or_check_config(workdir, config, write=False)  # refuse a different model
  template = create_train_state(config, total_steps=1)
  checkpoints = Checkpoints(workdir, config.checkpoint_every_steps, config.keep_checkpoints)
  try:
    state = checkpoints.restore_latest(template)
  finally:
    checkpoints.close()
  if state is None:
    raise ValueError(f"workdir={str(workdir)!r} holds no readable checkpoint")
  return state


def evaluate_checkpoint(config: Any, workdir: str | Path,
                        data: dict[str, dict[str, np.ndarray]] | None = None) -> dict[str, float]:
  """Test loss and accuracy of the latest checkpoint in `workdir`."""
  config = validate(config)
  state = restore_state(config, workdir)
  test = data["test"] if data is not None else dict(zip(
      ("image", "label"),
      mnist_source.load_split(config.dataset, "test", config.tfds_data_dir, config.idx_dir),
      strict=True))
  runner = Runner(choose_mode(config.parallel))
  result = Evaluator(runner, runner.replicate(test), len(test["label"]),
                     config.eval_batch_size, config.dataset)(runner.replicate(state))
  return {**result, "step": int(state.step)}


def predict(config: Any, workdir: str | Path, images: np.ndarray) -> np.ndarray:
  """Class probabilities (B, num_classes) of uint8 (B, H, W, C) images, latest checkpoint."""
  config = validate(config)
  state = restore_state(config, workdir)
  spec = mnist_source.dataset_spec(config.dataset)
  logits = jax.jit(state.apply_fn)({"params": state.params},
                                   input_pipeline.normalize(images, spec.mean, spec.std))
  return np.asarray(jax.nn.softmax(logits, axis=-1))
