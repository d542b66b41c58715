"""The steps: pure functions of (state, batch, rng), the state as `train_state` makes it.

`train_step` and `eval_step` take a batch of arrays; `compile_train_step` and `Evaluator`
wrap them for data held on the device(s), gathering, augmenting and normalising each batch
inside the compiled step, laid over the devices by a `parallel.Runner`.

Layer 4 of vit_jax.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from vit_jax import input_pipeline
from vit_jax.experiment_config import ExperimentConfig
from vit_jax.parallel import Runner
from vit_jax.train_state import TrainState, evaluation_params, update_average
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


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, axis_name: str | None = None,
              num_passes: int = 1):
  """Sums over the examples of `batch` whose 'mask' is True: loss, correct, count.

  `batch`: 'image' float32 (B, H, W, C) normalised, or (B, V, H, W, C): V views of each
  example, whose class probabilities are averaged; 'label' int32 (B,); 'mask' bool (B,).
  `num_passes`: as `view_averaged_log_probabilities`'.
  Returns three float32 scalars, summed over the devices of `axis_name` if given.
  """
  log_probs = view_averaged_log_probabilities(state.apply_fn, evaluation_params(state),
                                              batch["image"], num_passes)
  mask = batch["mask"].astype(jnp.float32)
  label_log_probs = jnp.take_along_axis(log_probs, batch["label"][:, None], axis=-1)[:, 0]
  sums = {"loss": -jnp.sum(label_log_probs * mask),
          "correct": jnp.sum((jnp.argmax(log_probs, -1) == batch["label"]) * mask),
          "count": jnp.sum(mask)}
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums


def view_averaged_log_probabilities(apply_fn, params, images: jax.Array,
                                    num_passes: int = 1) -> jax.Array:
  """log of the class probabilities averaged over views: images (B, H, W, C), one view, or
  (B, V, H, W, C) -> (B, num_classes).

  The B * V images go through the model in `num_passes` forward passes (`lax.map`; it must
  divide B * V): on a CPU, passes that fit its caches measured faster than one large pass,
  as training's micro-batches do (`Evaluator` chooses them).
  """
  views = images if images.ndim == 5 else images[:, None]
  batch, num_views = views.shape[:2]
  flat = views.reshape(batch * num_views, *views.shape[2:])

  forward = functools.partial(apply_fn, {"params": params}, train=False)
  if num_passes > 1:  # strided, as training's micro-batches: (k, B*V/k, ...) and back
    logits = jax.lax.map(forward, split_microbatches(flat, num_passes))
    logits = logits.swapaxes(0, 1).reshape(len(flat), -1)
  else:
    logits = forward(flat)
  return average_over_views(logits.reshape(batch, num_views, -1))


def average_over_views(logits: jax.Array) -> jax.Array:
  """(B, V, num_classes) logits of V views of each image -> (B, num_classes), the log of
  their class probabilities' mean."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  return jax.nn.logsumexp(log_probs, axis=1) - jnp.log(logits.shape[1])


# --- The steps on device-resident data --------------------------------------------------

def _train_on_indices(state, data, indices, positions, rng, *, config: ExperimentConfig,
                      num_microbatches: int, distortion_end: int | None, axis_name):
  """`training_batch`, then `train_step`."""
  augment_rng, dropout_rng = jax.random.split(rng)
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


def compile_train_step(config: ExperimentConfig, runner: Runner, seeds: bool = False,
                       total_steps: int | None = None):
  """`_train_on_indices` for `runner`: (state, data, indices, positions, rng) -> (state, metrics).

  `total_steps`: the run's length, for `undistorted_final_epochs` (None: the distortions
  throughout, as the benchmark's timing windows take them).

  With `seeds`, the step of several seeds at once (`vit_jax.seeds`): `jax.vmap` over a state
  stacked on a leading seed axis, indices (B, seeds) (a column per seed) and rng (seeds, 2);
  the data and positions are shared, the metrics gain the seed axis.
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
  return runner.compile(step, in_axes=(0, 0, 0, 0, None), donate_argnums=(0,))


def _over_seeds(step):
  def seeded(states, data, indices, positions, rngs, *, axis_name):
    one_seed = functools.partial(step, axis_name=axis_name)
    return jax.vmap(one_seed, in_axes=(0, None, 1, None, 0))(states, data, indices, positions,
                                                             rngs)
  return seeded


def _eval_on_indices(state, data, indices, mask, *, dataset: str, max_shift: int, flip: bool,
                     num_passes: int, axis_name):
  views = input_pipeline.evaluation_views(data["image"][indices], max_shift, flip)
  batch = {"image": input_pipeline.normalize(views, dataset),
           "label": data["label"][indices], "mask": mask}
  return eval_step(state, batch, axis_name=axis_name, num_passes=num_passes)


@dataclasses.dataclass
class Evaluator:
  """Evaluates a state over a whole split, every example exactly once."""
  runner: Runner
  data: Any  # on device(s): {'image': uint8 (N, H, W, C), 'label': int32 (N,)}
  num_examples: int
  batch_size: int
  dataset: str
  max_shift: int = 0  # config.eval_max_shift: the shifted views averaged over (0: none)
  flip: bool = False  # config.eval_flip: each view's mirror image averaged over too
  images_per_pass: int = 0  # a device's forward passes take up to this many (0: its share)

  def __post_init__(self):
    self.num_passes, self.device_images_per_pass = input_pipeline.evaluation_passes(
        self.batch_size // self.runner.num_devices, self.max_shift, self.flip, self.images_per_pass)
    self.step = self.runner.compile(functools.partial(
        _eval_on_indices, dataset=self.dataset, max_shift=self.max_shift, flip=self.flip,
        num_passes=self.num_passes), in_axes=(0, 0, 0, 0))

  def __call__(self, state) -> dict[str, float]:
    totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for indices, mask in input_pipeline.eval_indices(self.num_examples, self.batch_size):
      # Each batch finishes on every device, not only the first, before the next is sent:
      # with several in flight (each has an all-reduce), XLA's CPU devices waited on each
      # other until XLA aborted (two devices; reproduced with eight, tests/test_train.py).
      sums = jax.block_until_ready(self.step(state, self.data, self.runner.split_batch(indices),
                                             self.runner.split_batch(mask)))
      sums = self.runner.unreplicate(sums)
      for k in totals:
        totals[k] += float(sums[k])
    assert int(totals["count"]) == self.num_examples, totals
    return {"eval_loss": totals["loss"] / totals["count"],
            "eval_accuracy": totals["correct"] / totals["count"]}
