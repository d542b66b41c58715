"""The training step: a pure function of (state, batch, rng), the state as `train_state`
makes it.

`train_step` takes a batch of arrays; `compile_train_steps` wraps it for data held on the
device(s), gathering, augmenting and normalising each batch inside the compiled call, several
steps a call, laid over the devices by a `parallel.Runner`. Evaluation: `vit_jax.evaluation`.

Layer 4 of vit_jax.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from vit_jax import input_pipeline
from vit_jax.experiment_config import ExperimentConfig
from vit_jax.parallel import Runner
from vit_jax.train_state import TrainState, update_average
from vit_jax.training_images import distortion_end_step, training_batch


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example cross-entropy, (B, K) logits and (B,) int labels -> (B,)."""
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def target_losses(logits: jax.Array, batch: dict[str, jax.Array], label_smoothing: float = 0.0
                  ) -> jax.Array:
  """(B, K) logits -> (B,) cross-entropies against 'label', or where `batch` is mixed
  (`augment.random_mix`) against 'mix_weight' (B,) of it and the rest of 'mix_label' (B,),
  or against 'target' (B, K) where there is one (distillation, `training_batch`)."""
  if "target" in batch:
    targets = optax.smooth_labels(batch["target"], label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)
  losses = cross_entropy(logits, batch["label"], label_smoothing)
  if "mix_weight" not in batch:
    return losses
  weight = batch["mix_weight"]  # cross-entropy is linear in the target: the mixed target's
  return weight * losses + (1 - weight) * cross_entropy(logits, batch["mix_label"],
                                                        label_smoothing)


def larger_share_labels(batch: dict[str, jax.Array]) -> jax.Array:
  """(B,) each example's label, or in a mixed batch the label of the larger share of it."""
  if "mix_weight" not in batch:
    return batch["label"]
  return jnp.where(batch["mix_weight"] >= 0.5, batch["label"], batch["mix_label"])


def split_microbatches(batch: dict[str, jax.Array], num_microbatches: int
                       ) -> dict[str, jax.Array]:
  """(B, ...) arrays -> (k, B/k, ...): micro-batch j holds examples j, j + k, j + 2k, ...

  Strided, not contiguous, so that under 'shard' (the batch's rows split over the devices)
  every micro-batch still spreads over all devices.
  """
  def split(x):
    if x.shape[0] % num_microbatches:
      raise ValueError(f"{num_microbatches} micro-batches do not divide a batch of "
                       f"{x.shape[0]}")
    strided = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:])
    return strided.swapaxes(0, 1)

  return jax.tree_util.tree_map(split, batch)


def mean_over_devices(tree: Any, axis_name: str) -> Any:
  """`lax.pmean` of every (float) leaf of `tree`, sent as one flat buffer.

  XLA's CPU runtime synchronises the devices once per array of an all-reduce (76 times a
  step for the `seed` ViT's gradients and metrics; docs/performance.md has its cost). One
  buffer synchronises them once; the means are the same.
  """
  flat, unflatten = ravel_pytree(tree)
  return unflatten(jax.lax.pmean(flat, axis_name))


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               label_smoothing: float = 0.0, num_microbatches: int = 1,
               axis_name: str | None = None):
  """One AdamW update on `batch` = {'image': (B, H, W, C) float, 'label': (B,) int}, and of
  the parameters' moving average where `state` keeps one (`EmaTrainState`); a mixed batch
  has 'mix_label' and 'mix_weight' too, a distilled one 'target' (B, K) (`target_losses`).

  The batch goes through the model in `num_microbatches` micro-batches of
  B / num_microbatches examples (`lax.scan`), their gradients summed: the update of the
  whole batch at once, up to float rounding (and dropout's draws), with one micro-batch's
  activations in memory at a time.
  The gradients are summed as one flat vector (`ravel_pytree`'s order), which the all-reduce
  and the norm take as it is and the optimizer, itself on one flat vector
  (`train_state.create_train_state`), forms again: a handful of operations a step instead of
  several for each of the model's arrays.
  Under pmap (`axis_name` set) gradients and metrics are averaged across devices,
  so each device must hold the same number of examples.

  Returns:
    (new state, {'loss', 'accuracy'} of this batch before the update, and 'grad_norm', the
    global norm of the batch's gradient before clipping).
  """
  def sums(params, micro, rng):
    logits = state.apply_fn({"params": params}, micro["image"], train=True,
                            rngs={"dropout": rng})
    correct = jnp.sum(jnp.argmax(logits, -1) == larger_share_labels(micro)).astype(jnp.int32)
    return jnp.sum(target_losses(logits, micro, label_smoothing)), correct

  def accumulate(totals, indexed_microbatch):
    index, micro = indexed_microbatch
    # Each micro-batch draws its own dropout masks; a single one draws the step's own.
    micro_rng = rng if num_microbatches == 1 else jax.random.fold_in(rng, index)
    (loss, correct), grads = jax.value_and_grad(sums, has_aux=True)(
        state.params, micro, micro_rng)
    return jax.tree_util.tree_map(jnp.add, totals, (loss, correct, ravel_pytree(grads)[0])), None

  flat_params, unflatten = ravel_pytree(state.params)
  zeros = (jnp.zeros(()), jnp.zeros((), jnp.int32), jnp.zeros_like(flat_params))
  microbatches = (jnp.arange(num_microbatches), split_microbatches(batch, num_microbatches))
  (loss, correct, grads), _ = jax.lax.scan(accumulate, zeros, microbatches)
  num_examples = batch["label"].shape[0]
  grads = grads / num_examples
  metrics = {"loss": loss / num_examples, "accuracy": correct / num_examples}
  if axis_name is not None:
    grads, metrics = mean_over_devices((grads, metrics), axis_name)
  # A finite loss can still have a non-finite gradient, which would make the state NaN.
  metrics["grad_norm"] = optax.tree.norm(grads)
  return update_average(state.apply_gradients(grads=unflatten(grads))), metrics


# --- The steps on device-resident data --------------------------------------------------

def _train_on_indices(state, data, indices, positions, key, *, config: ExperimentConfig,
                      num_microbatches: int, distortion_end: int | None, axis_name):
  """`training_batch`, then `train_step`; the step's random numbers come from `key` folded
  with the state's own step, so they depend on (seed, step) alone."""
  augment_rng, dropout_rng = jax.random.split(jax.random.fold_in(key, state.step))
  keys = input_pipeline.example_keys(augment_rng, positions)
  batch = training_batch(data, indices, keys, state.step, config, distortion_end)
  if axis_name is not None:
    dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))
  return train_step(state, batch, dropout_rng, label_smoothing=config.label_smoothing,
                    num_microbatches=num_microbatches, axis_name=axis_name)


def microbatches_per_step(config: ExperimentConfig, runner: Runner) -> int:
  """Micro-batches per device per training step, after checking that the devices share both
  batches.

  Raises a one-line ValueError naming the config field that they cannot share. An
  unresolved microbatch_size='auto' (`vit_jax.auto.resolve` chooses it) counts as one.
  """
  runner.check_batch_size("batch_size", config.batch_size)
  runner.check_batch_size("eval_batch_size", config.eval_batch_size)
  if config.microbatch_size == "auto":
    return 1
  return runner.num_microbatches(config.batch_size, config.microbatch_size)


def compile_train_steps(config: ExperimentConfig, runner: Runner, seeds: bool = False,
                        total_steps: int | None = None):
  """Up to `config.steps_per_call` training steps in one call, for `runner`:
  (state, data, indices, positions, key, count) -> (state, metrics).

  indices: (B, steps_per_call) example indices, a column per step (`call_indices`), laid
  over the devices by `runner.split_batch`; only the first `count` columns are taken.
  key: the run's key (`jax.random.PRNGKey(seed)`), which each step folds with its own step
  number. metrics: each step's, stacked on a leading axis of `steps_per_call` (zeros past
  `count`).
  `total_steps`: the run's length, for `undistorted_final_epochs` (None: the distortions
  throughout, as the benchmark's timing windows take them).

  With `seeds`, the steps of several seeds at once (`vit_jax.seeds`): `jax.vmap` over a state
  stacked on a leading seed axis, indices (B, steps_per_call, seeds) and keys (seeds, 2); the
  data and positions are shared, the metrics gain the seed axis after the step axis.
  The state's buffers are donated: the caller keeps only the returned state.
  """
  if config.microbatch_size == "auto":
    raise ValueError("config.microbatch_size='auto' is chosen when a run starts "
                     "(vit_jax.auto.resolve), before the step is compiled")
  step = functools.partial(
      _train_on_indices, config=config,
      num_microbatches=microbatches_per_step(config, runner),
      distortion_end=distortion_end_step(config, total_steps))
  if seeds:
    step = _over_seeds(step)
  return runner.compile(_steps_in_one_call(step, config.steps_per_call),
                        in_axes=(0, 0, 0, 0, None, None), donate_argnums=(0,))


def _over_seeds(step):
  def seeded(states, data, indices, positions, keys, *, axis_name):
    one_seed = functools.partial(step, axis_name=axis_name)
    return jax.vmap(one_seed, in_axes=(0, None, 1, None, 0))(states, data, indices, positions,
                                                             keys)
  return seeded


def _steps_in_one_call(step, steps_per_call: int):
  """`step` -> `count` of its updates in one compiled call (a `lax.fori_loop`): the host
  dispatches once a call instead of once a step (the devices still average each step's
  gradients)."""
  def train_steps(state, data, indices, positions, key, count, *, axis_name):
    def update(i, carry):
      state, metrics = carry
      state, step_metrics = step(state, data, indices[:, i], positions, key,
                                 axis_name=axis_name)
      return state, jax.tree_util.tree_map(lambda all_, one: all_.at[i].set(one), metrics,
                                           step_metrics)

    shapes = jax.eval_shape(lambda s: step(s, data, indices[:, 0], positions, key,
                                           axis_name=axis_name)[1], state)
    metrics = jax.tree_util.tree_map(
        lambda m: jnp.zeros((steps_per_call, *m.shape), m.dtype), shapes)
    return jax.lax.fori_loop(0, count, update, (state, metrics))
  return train_steps


def call_indices(indices_of, first: int, count: int, steps_per_call: int) -> np.ndarray:
  """The example indices of steps `first` .. `first + count - 1` (0-based) as one call of
  `compile_train_steps` takes them: (B, steps_per_call, ...), `indices_of(step)` (B, ...) in
  column j for step first + j, zeros in the columns past `count`."""
  columns = [indices_of(step) for step in range(first, first + count)]
  columns += [np.zeros_like(columns[0])] * (steps_per_call - count)
  return np.stack(columns, axis=1)
