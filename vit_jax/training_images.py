"""What a training step does to its images, as the config says: the shifts, then the
distortions (random affine maps, elastic distortion, random erasing), then the flips, each
example from its own key, then the mixing of images and their targets (mixup, CutMix); and,
with `undistorted_final_epochs`, the last epochs with the shifts and flips only.

The last epochs without the distortions follow YOLOX (Ge et al. 2021, its strongest
augmentations off for the last 15 epochs): the model's last updates see images like the
ones it is evaluated on. All of it runs inside the compiled training step.

Layer 4 of vit_jax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vit_jax import augment, input_pipeline
from vit_jax.experiment_config import ExperimentConfig


def _stream(keys: jax.Array, i: int) -> jax.Array:
  """(B, 2) keys -> each example's own stream i: one per augmentation."""
  return jax.vmap(lambda key: jax.random.fold_in(key, i))(keys)


def augmented(images: jax.Array, keys: jax.Array, config: ExperimentConfig,
              distort: bool = True) -> jax.Array:
  """(B, H, W, C) images shifted, then (with `distort`) through a random affine map,
  elastically distorted and randomly erased, then mirrored, as `config` says; keys (B, 2),
  one per example. Each augmentation draws from its own stream, so an image's shift and
  flip are the same with and without `distort`."""
  images = input_pipeline.random_translate(images, keys, config.augment_max_shift)
  if distort:
    images = augment.random_affine(images, _stream(keys, 1), config.augment_max_rotation,
                                   config.augment_max_scale, config.augment_max_shear)
    images = augment.random_elastic(images, _stream(keys, 3), config.augment_elastic_alpha,
                                    config.augment_elastic_sigma)
    images = augment.random_erasing(images, _stream(keys, 2), config.random_erasing)
  return augment.random_flip(images, _stream(keys, 4), config.augment_flip)


def distortion_end_step(config: ExperimentConfig, total_steps: int | None) -> int | None:
  """The first step (0-based) of the last `config.undistorted_final_epochs` epochs of a run
  of `total_steps`, which go without the distortions; None where no step does (or where
  there is no run's length: the benchmark's timing windows, which keep them). A config with
  no distortion to turn off has no undistorted epochs (`ExperimentConfig` refuses them)."""
  if not config.undistorted_final_epochs or total_steps is None:
    return None
  undistorted = round(total_steps * config.undistorted_final_epochs / config.num_epochs)
  return total_steps - undistorted if undistorted else None


def undistorted_line(config: ExperimentConfig, total_steps: int, step: int, first_step: int
                     ) -> str | None:
  """The line a run prints as it takes 0-based `step`, if that is the first of its
  undistorted final epochs, or the first it takes (`first_step`, resumed) inside them."""
  end = distortion_end_step(config, total_steps)
  if end is None or step != max(end, first_step):
    return None
  return (f"step {step + 1}: the last {config.undistorted_final_epochs:g} epochs, without the "
          "distortions")


def training_images(images: jax.Array, keys: jax.Array, step: jax.Array,
                    config: ExperimentConfig, distortion_end: int | None) -> jax.Array:
  """`augmented` images for training step `step` (a traced scalar, the state's): without
  the distortions from step `distortion_end` on (`distortion_end_step`; None: never).
  float32 (B, H, W, C) where distorted or switched, else the images' dtype."""
  if distortion_end is None:
    return augmented(images, keys, config)
  return jax.lax.cond(
      step < distortion_end,
      lambda x: augmented(x, keys, config).astype(jnp.float32),
      lambda x: augmented(x, keys, config, distort=False).astype(jnp.float32), images)


def mixed_images(images: jax.Array, keys: jax.Array, step: jax.Array, config: ExperimentConfig,
                 distortion_end: int | None) -> tuple[jax.Array, jax.Array | None]:
  """`training_images` mixed in pairs as `augment.random_mix` does (from each example's own
  stream of `keys`), unmixed from step `distortion_end` on: (B, H, W, C) images and (B,)
  weights of their own labels; the images alone and None where the config mixes nothing."""
  if not (config.mixup_alpha or config.cutmix_alpha):
    return images, None
  mixed, weights = augment.random_mix(images, _stream(keys, 5), config.mixup_alpha,
                                      config.cutmix_alpha)
  if distortion_end is None:
    return mixed, weights
  mixing = step < distortion_end
  return (jnp.where(mixing, mixed, images.astype(jnp.float32)),
          jnp.where(mixing, weights, jnp.ones_like(weights)))


def training_batch(data, indices, keys, step, config: ExperimentConfig,
                   distortion_end: int | None) -> dict[str, jax.Array]:
  """The examples `indices` of `data`, augmented (`training_images`), mixed in pairs where the
  config says (`mixed_images`: 'mix_label' and 'mix_weight' too) and normalised; with a
  teacher ('teacher' (N, K) in `data`, `config.distill_weight`), 'target' (B, K) too: each
  one-hot label with that share of it the teacher's probabilities."""
  images = training_images(data["image"][indices], keys, step, config, distortion_end)
  images, weights = mixed_images(images, keys, step, config, distortion_end)
  labels = data["label"][indices]
  batch = {"image": input_pipeline.normalize(images, config.dataset), "label": labels}
  if weights is not None:
    batch.update(mix_label=labels[augment.mix_partners(len(labels))], mix_weight=weights)
  if config.distill_weight:
    teacher = data["teacher"][indices]
    batch["target"] = (1 - config.distill_weight) * jax.nn.one_hot(
        labels, teacher.shape[-1]) + config.distill_weight * teacher
  return batch
