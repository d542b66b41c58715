"""Evaluation: the pure `eval_step`, and `Evaluator`, a whole split on the devices.

`eval_step` sums the loss and the correct predictions over a batch, averaging each image's
class probabilities over its views (test-time augmentation); `Evaluator` gathers each batch
from data held on the device(s), in passes that fit the caches, over a `parallel.Runner`.

Layer 4 of vit_jax.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from vit_jax import input_pipeline
from vit_jax.parallel import Runner
from vit_jax.steps import split_microbatches
from vit_jax.train_state import TrainState, evaluation_params


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
