"""Augmentations beyond the shift: random affine maps, elastic distortions, random erasing,
horizontal flips and the mixing of pairs of images (mixup, CutMix), per example.

Each draws from its example's own key (`input_pipeline.example_keys`), so the result does not
depend on how a batch is split over devices, and runs inside the compiled training step. Each
is the identity at strength 0. Flips are for clothes (Fashion-MNIST), never for digits: a
mirrored digit is another digit (or none), and the config refuses them for MNIST.

Layer 3 of vit_jax: knows nothing of models or training.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.ndimage import map_coordinates


def affine(image: jax.Array, rotation: jax.Array, scale: jax.Array, shear: jax.Array
           ) -> jax.Array:
  """One (H, W, C) image rotated by `rotation`, scaled by `scale` and sheared by `shear`
  (radians, horizontally) about its centre, bilinear, zero outside; the same shape."""
  chex.assert_rank(image, 3)
  height, width, _ = image.shape
  rows, cols = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
  y, x = rows - (height - 1) / 2, cols - (width - 1) / 2
  cos, sin = jnp.cos(rotation), jnp.sin(rotation)
  # Where each output pixel comes from: the inverse of scale, then shear, then rotation.
  ry, rx = cos * y - sin * x, sin * y + cos * x
  sy, sx = ry, rx - jnp.tan(shear) * ry
  src_y, src_x = sy / scale + (height - 1) / 2, sx / scale + (width - 1) / 2
  return _bilinear(image, src_y, src_x)


def _bilinear(image: jax.Array, y: jax.Array, x: jax.Array) -> jax.Array:
  """(H, W, C) sampled at the (H, W) float coordinates (y, x), 0 outside -> float32 (H, W, C)."""
  return jnp.stack([map_coordinates(image[..., c].astype(jnp.float32), [y, x], order=1,
                                    mode="constant", cval=0.0)
                    for c in range(image.shape[-1])], axis=-1)


def random_affine(images: jax.Array, keys: jax.Array, max_rotation: float, max_scale: float,
                  max_shear: float) -> jax.Array:
  """Each of (B, H, W, C) images through its own `affine`: a rotation and a shear uniform in
  +-max_rotation and +-max_shear degrees, a scale uniform in [1 - max_scale, 1 + max_scale].

  keys: (B, 2), one per image. Returns float32 (B, H, W, C), or `images` if all are 0.
  """
  chex.assert_rank(images, 4)
  if max_rotation == max_scale == max_shear == 0:
    return images

  def one(image, key):
    rotation, scale, shear = jax.random.uniform(key, (3,), minval=-1.0, maxval=1.0)
    return affine(image, jnp.deg2rad(max_rotation) * rotation, 1 + max_scale * scale,
                  jnp.deg2rad(max_shear) * shear)

  out = jax.vmap(one)(images, keys)
  chex.assert_equal_shape([out, images])
  return out


def gaussian_taps(sigma: float) -> jax.Array:
  """A normalised 1-D Gaussian of `sigma` pixels, out to 3 sigma: (2 * ceil(3 sigma) + 1,)."""
  if not sigma > 0:
    raise ValueError(f"sigma={sigma} must be positive")
  radius = int(np.ceil(3 * sigma))
  taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
  return jnp.asarray(taps / taps.sum(), jnp.float32)


def random_elastic(images: jax.Array, keys: jax.Array, alpha: float, sigma: float = 4.0
                   ) -> jax.Array:
  """Each of (B, H, W, C) images warped by its own smooth random displacement field (Simard
  et al. 2003): uniform noise in [-1, 1] per pixel and axis, blurred by a Gaussian of `sigma`
  pixels (zero outside), times `alpha`; bilinear, zero outside. alpha 34 and sigma 4 move
  pixels by about 1.5 on average, and neighbouring pixels alike.

  keys: (B, 2), one per image. Returns float32 (B, H, W, C), or `images` if alpha is 0.
  """
  chex.assert_rank(images, 4)
  if alpha == 0:
    return images
  _, height, width, _ = images.shape
  rows, cols = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
  taps = gaussian_taps(sigma)
  radius = len(taps) // 2

  def smooth(line):  # the full convolution's middle: `mode="same"` would keep the taps'
    return jnp.convolve(line, taps, mode="full")[radius:radius + len(line)]  # length if longer

  def blur(field):  # (H, W): separable, rows then columns
    return jax.vmap(smooth, 1, 1)(jax.vmap(smooth)(field))

  def one(image, key):
    noise = jax.random.uniform(key, (2, height, width), minval=-1.0, maxval=1.0)
    dy, dx = alpha * blur(noise[0]), alpha * blur(noise[1])
    return _bilinear(image, rows + dy, cols + dx)

  return jax.vmap(one)(images, keys)


def random_erasing(images: jax.Array, keys: jax.Array, probability: float,
                   area: tuple[float, float] = (0.02, 0.2)) -> jax.Array:
  """With `probability`, zeroes one random rectangle of each (B, H, W, C) image: its area a
  uniform share `area` of the image, its aspect ratio log-uniform in [1/3, 3] (as Zhong et al.
  2020). keys: (B, 2). Returns the same shape and dtype; `images` if probability is 0."""
  chex.assert_rank(images, 4)
  if probability == 0:
    return images
  _, height, width, _ = images.shape
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]

  def one(image, key):
    apply_key, area_key, ratio_key, top_key, left_key = jax.random.split(key, 5)
    share = jax.random.uniform(area_key, minval=area[0], maxval=area[1])
    ratio = jnp.exp(jax.random.uniform(ratio_key, minval=-jnp.log(3.0), maxval=jnp.log(3.0)))
    h = jnp.clip(jnp.round(jnp.sqrt(share * height * width * ratio)), 1, height).astype(int)
    w = jnp.clip(jnp.round(jnp.sqrt(share * height * width / ratio)), 1, width).astype(int)
    top = jax.random.randint(top_key, (), 0, height - h + 1)
    left = jax.random.randint(left_key, (), 0, width - w + 1)
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    erase = inside & jax.random.bernoulli(apply_key, probability)
    return jnp.where(erase[..., None], jnp.zeros_like(image), image)

  return jax.vmap(one)(images, keys)


def random_flip(images: jax.Array, keys: jax.Array, probability: float) -> jax.Array:
  """With `probability`, mirrors each (B, H, W, C) image left to right. keys: (B, 2).
  Returns the same shape and dtype; `images` if probability is 0."""
  chex.assert_rank(images, 4)
  if probability == 0:
    return images
  flip = jax.vmap(lambda key: jax.random.bernoulli(key, probability))(keys)
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def mix_partners(batch_size: int) -> np.ndarray:
  """(batch_size,) each example's partner in the mixing: its neighbour, in pairs (0, 1),
  (2, 3), ... (the last of an odd batch its own). Pairs of neighbours stay on one device where
  a batch is split over devices in even shares, so the pairs do not depend on how many."""
  return np.minimum(np.arange(batch_size) ^ 1, batch_size - 1)


def random_mix(images: jax.Array, keys: jax.Array, mixup_alpha: float, cutmix_alpha: float
               ) -> tuple[jax.Array, jax.Array]:
  """Mixes each (B, H, W, C) image x with its partner x' (`mix_partners`) by mixup (Zhang et
  al. 2018: lam x + (1 - lam) x') or CutMix (Yun et al. 2019: a box of about (1 - lam) of the
  image pasted from x'), lam drawn from Beta(alpha, alpha) per example. With both alphas
  set, each example takes one of the two with equal chance. keys: (B, 2).

  Returns float32 images (B, H, W, C) and each one's weight (B,): the share of it that is
  its own (lam, or CutMix's box area made exact), the weight of its own label in its target
  and 1 - weight its partner's. At both alphas 0, `images` and weights of 1.
  """
  chex.assert_rank(images, 4)
  chex.assert_rank(keys, 2)
  batch, height, width, _ = images.shape
  if not (mixup_alpha or cutmix_alpha):
    return images, jnp.ones(batch, jnp.float32)
  images = images.astype(jnp.float32)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]

  def one(image, partner, key):
    choice_key, lam_key, row_key, col_key = jax.random.split(key, 4)
    cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or jax.random.bernoulli(choice_key))
    alpha = jnp.where(cutmix, cutmix_alpha, mixup_alpha)  # never a 0 that is taken
    lam = jax.random.beta(lam_key, alpha, alpha)
    side = jnp.sqrt(1 - lam)  # the box's share of each side
    half_h = jnp.round(height * side / 2).astype(int)
    half_w = jnp.round(width * side / 2).astype(int)
    centre_row = jax.random.randint(row_key, (), 0, height)
    centre_col = jax.random.randint(col_key, (), 0, width)
    box = ((rows >= centre_row - half_h) & (rows < centre_row + half_h)
           & (cols >= centre_col - half_w) & (cols < centre_col + half_w))
    pasted = jnp.where(box[..., None], partner, image)
    box_weight = 1 - jnp.mean(box.astype(jnp.float32))  # the box clipped at the borders
    blended = lam * image + (1 - lam) * partner
    return jnp.where(cutmix, pasted, blended), jnp.where(cutmix, box_weight, lam)

  return jax.vmap(one)(images, images[mix_partners(batch)], keys)
