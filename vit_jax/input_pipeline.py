"""Batches from a dataset held whole in (device) memory: order, augmentation, scaling.

MNIST fits in memory, so the pipeline is index arithmetic: a step's examples are a
slice of a per-epoch permutation drawn from (seed, epoch), and gathering,
augmenting and normalising happen inside the compiled step. The data order is a
function of the step number alone, so a resumed run sees the batches an
uninterrupted run would have.

Layer 3 of vit_jax: knows nothing of models or training.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import mnist_source


class EpochOrder:
  """The training order: a fresh permutation of the examples every epoch.

  Every epoch has `num_examples // batch_size` full batches; the remainder of each
  permutation is skipped, so each batch is whole and each epoch differently short.
  """

  def __init__(self, num_examples: int, batch_size: int, seed: int):
    if not 1 <= batch_size <= num_examples:
      raise ValueError(f"batch_size={batch_size} must be between 1 and the number of "
                       f"examples, {num_examples}")
    self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
    self.steps_per_epoch = num_examples // batch_size
    self._cached: tuple[int, np.ndarray] | None = None

  def permutation(self, epoch: int) -> np.ndarray:
    if self._cached is None or self._cached[0] != epoch:
      perm = np.random.default_rng((self.seed, epoch)).permutation(self.num_examples)
      self._cached = (epoch, perm)
    return self._cached[1]

  def indices(self, step: int) -> np.ndarray:
    """-> int32 (batch_size,): the example indices of global batch `step` (0-based)."""
    epoch, i = divmod(step, self.steps_per_epoch)
    perm = self.permutation(epoch)
    return perm[i * self.batch_size:(i + 1) * self.batch_size].astype(np.int32)


HOLD_OUT_SEED = 20261202  # one fixed choice of validation examples, whatever the run's seed


def hold_out(split: dict[str, np.ndarray], num_examples: int
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Splits {'image': (N, ...), 'label': (N,)} into (the rest, `num_examples` held out).

  The held-out examples are a fixed random choice (`HOLD_OUT_SEED`), the same in every run;
  both parts keep the original order of their examples.
  """
  total = len(split["label"])
  if not 0 <= num_examples < total:
    raise ValueError(f"validation_examples={num_examples} must be in [0, {total})")
  held = np.zeros(total, bool)
  held[np.random.default_rng(HOLD_OUT_SEED).permutation(total)[:num_examples]] = True
  return ({k: v[~held] for k, v in split.items()}, {k: v[held] for k, v in split.items()})


def eval_indices(num_examples: int, batch_size: int):
  """Yields (indices, mask) batches covering every example exactly once.

  indices: int32 (batch_size,); mask: bool (batch_size,). The last batch is padded with
  index 0 and mask False, so that every batch has the same shape (one compilation) and
  padding never counts.
  """
  for start in range(0, num_examples, batch_size):
    idx = np.arange(start, start + batch_size)
    mask = idx < num_examples
    yield np.where(mask, idx, 0).astype(np.int32), mask


def random_translate(images: jax.Array, rng: jax.Array, max_shift: int) -> jax.Array:
  """Shifts each image by its own random (dy, dx) in [-max_shift, max_shift], zero-filled.

  Translation, not flipping: a mirrored digit is a different (or no) digit.

  Args:
    images: (B, H, W, C).
    rng: (B, 2) keys (`example_keys`), one per image, so that an image's shift does
      not depend on how the batch is split across devices.
    max_shift: largest shift in pixels.

  Returns:
    (B, H, W, C).
  """
  chex.assert_rank(images, 4)
  if max_shift == 0:
    return images
  _, height, width, _ = images.shape
  padded = _zero_padded(images, max_shift)

  def shift_one(image, key):
    dy, dx = jax.random.randint(key, (2,), 0, 2 * max_shift + 1)
    return jax.lax.dynamic_slice(image, (dy, dx, 0), (height, width, image.shape[-1]))

  out = jax.vmap(shift_one)(padded, rng)
  chex.assert_equal_shape([out, images])
  return out


def shifted_views(images: jax.Array, max_shift: int) -> jax.Array:
  """Every shift of each image by (dy, dx) in [-max_shift, max_shift], zero-filled, as
  `random_translate` draws them: the views that evaluation averages over.

  (B, H, W, C) -> (B, (2 max_shift + 1)^2, H, W, C); the unshifted view is the middle one.
  Batch first, so that a batch split over devices keeps each image's views on its device.
  """
  chex.assert_rank(images, 4)
  _, height, width, _ = images.shape
  padded = _zero_padded(images, max_shift)
  offsets = range(2 * max_shift + 1)
  views = jnp.stack([padded[:, dy:dy + height, dx:dx + width]
                     for dy in offsets for dx in offsets], axis=1)
  chex.assert_shape(views, (images.shape[0], len(offsets) ** 2, *images.shape[1:]))
  return views


def num_evaluation_views(max_shift: int, flip: bool) -> int:
  """V of `evaluation_views`: (2 max_shift + 1)^2, twice that with `flip`."""
  return (2 * max_shift + 1) ** 2 * (2 if flip else 1)


def cache_sized_part(total: int, fits: int) -> int:
  """How many of `total` examples one pass takes when `fits` fit a CPU's caches: the largest
  divisor of `total` up to `fits`, or `total` itself where that divisor is under a quarter of
  `fits` and `total` at most 8 times it (a prime share of 127 would take 127 passes of one;
  passes of a quarter of what fits measured 0.90x, a whole share 4 times what fits about
  0.7x: docs/performance.md, "Defaults that fit the machine"); all of them where `fits` is 0
  (nothing is said to fit: a GPU's or TPU's `auto.eval_images_per_pass`)."""
  if fits < 1 or fits >= total:
    return total
  size = max(d for d in range(1, fits + 1) if total % d == 0)
  return total if size < fits // 4 and total <= 8 * fits else size


def evaluation_passes(examples: int, max_shift: int, flip: bool, fits: int) -> tuple[int, int]:
  """A device's `examples` times their views -> (forward passes, images a pass), the passes
  `cache_sized_part`s (under 'shard' each strided pass spreads over the devices alike)."""
  images = examples * num_evaluation_views(max_shift, flip)
  part = cache_sized_part(images, fits)
  return images // part, part


def unshifted_view(max_shift: int) -> int:
  """Where each image itself is among its `shifted_views` (and its `evaluation_views`)."""
  return (2 * max_shift + 1) ** 2 // 2


def evaluation_views(images: jax.Array, max_shift: int, flip: bool) -> jax.Array:
  """The views of each image that evaluation averages over: its shifts by up to `max_shift`
  pixels (`shifted_views`) and, with `flip`, each of those mirrored left to right.

  (B, H, W, C) -> (B, V, H, W, C), V = (2 max_shift + 1)^2, twice that with `flip`; the
  unmirrored views come first, so that V = 1 is the image alone.
  """
  views = shifted_views(images, max_shift)
  return jnp.concatenate([views, views[:, :, :, ::-1]], axis=1) if flip else views


def _zero_padded(images: jax.Array, width: int) -> jax.Array:
  """(B, H, W, C) -> (B, H + 2 width, W + 2 width, C), zeros around each image."""
  if width < 0:
    raise ValueError(f"max_shift={width} must not be negative")
  return jnp.pad(images, ((0, 0), (width, width), (width, width), (0, 0)))


def normalize(images: jax.Array, dataset: str) -> jax.Array:
  """uint8 grey levels -> float32 with `dataset`'s training mean at 0 and its std at 1.

  Any shape, e.g. (B, H, W, C); the result has the same.
  """
  spec = mnist_source.dataset_spec(dataset)
  return (images.astype(jnp.float32) / 255.0 - spec.mean) / spec.std


def example_keys(rng: jax.Array, positions: jax.Array) -> jax.Array:
  """One key per example, from its position in the global batch: positions (B,) -> (B, 2)."""
  return jax.vmap(lambda p: jax.random.fold_in(rng, p))(positions)
