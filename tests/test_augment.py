"""The affine, elastic, erasing and flip augmentations: what they do, per example, and nothing
at strength 0."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from vit_jax import augment, input_pipeline
from vit_jax.experiment_config import ExperimentConfig, validate
from vit_jax.model_configs import get_model_config
from vit_jax.training_images import augmented


def bar(vertical=False):
  """A (28, 28, 1) image: a bright bar 4 pixels thick through the centre, horizontal."""
  image = np.zeros((28, 28, 1), np.float32)
  image[12:16, 4:24] = 255.0
  return image.transpose(1, 0, 2) if vertical else image


def keys(n, seed=0):
  return input_pipeline.example_keys(jax.random.PRNGKey(seed), np.arange(n))


def test_affine_rotates_scales_and_shears_about_the_centre():
  np.testing.assert_allclose(augment.affine(bar(), 0.0, 1.0, 0.0), bar(), atol=1e-4)
  turned = np.asarray(augment.affine(bar(), np.pi / 2, 1.0, 0.0))
  np.testing.assert_allclose(turned, bar(vertical=True), atol=1e-3)
  shrunk = np.asarray(augment.affine(bar(), 0.0, 0.5, 0.0))
  assert np.count_nonzero(shrunk > 127) == pytest.approx(np.count_nonzero(bar() > 127) / 4,
                                                         rel=0.2)
  sheared = np.asarray(augment.affine(bar(vertical=True), 0.0, 1.0, np.pi / 4))
  top, bottom = sheared[4].argmax(), sheared[23].argmax()
  assert abs(abs(top - bottom) - 19) <= 2  # a 45-degree shear slants the vertical bar


@pytest.mark.parametrize("fn,strength", [
    (augment.random_affine, dict(max_rotation=30.0, max_scale=0.2, max_shear=10.0)),
    (augment.random_erasing, dict(probability=1.0)),
    (augment.random_elastic, dict(alpha=34.0, sigma=4.0)),
    (augment.random_flip, dict(probability=0.5)),
])
def test_random_augmentations_are_per_example_deterministic_in_range(fn, strength):
  fn = jax.jit(functools.partial(fn, **strength))
  images = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1)).astype(np.uint8)
  out = np.asarray(fn(images, keys(8)))
  assert out.shape == images.shape and out.min() >= 0 and out.max() <= 255
  if out.dtype == np.uint8:  # erasing and flips move or zero pixels, never make new levels
    assert set(np.unique(out)) <= set(np.unique(images)) | {0}
  np.testing.assert_array_equal(out, fn(images, keys(8)))  # the same keys, the same
  assert not np.array_equal(out, fn(images, keys(8, seed=1)))
  halves = np.concatenate([fn(images[:4], keys(8)[:4]), fn(images[4:], keys(8)[4:])])
  np.testing.assert_array_equal(out, halves)  # each example's own draw, however split


def test_strength_zero_is_the_identity():
  images = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1)).astype(np.uint8)
  assert augment.random_affine(images, keys(4), 0.0, 0.0, 0.0) is images
  assert augment.random_erasing(images, keys(4), 0.0) is images
  assert augment.random_elastic(images, keys(4), 0.0) is images
  assert augment.random_flip(images, keys(4), 0.0) is images
  config = ExperimentConfig(model=get_model_config("testing"), augment_max_shift=0)
  assert augmented(images, keys(4), config) is images


def test_an_elastic_warp_of_no_width_is_refused():  # it would divide by zero: NaN images
  images = np.zeros((4, 28, 28, 1), np.uint8)
  with pytest.raises(ValueError, match="sigma=0.0 must be positive"):
    augment.random_elastic(images, keys(4), 1.0, 0.0)


def test_elastic_displacements_are_smooth_and_as_large_as_blurred_noise_says():
  from scipy import ndimage

  # On a horizontal ramp, bilinear sampling is exact: the warped image minus the ramp is 8 dx.
  ramp = np.broadcast_to(8.0 * np.arange(28.0)[None, :, None], (64, 28, 28, 1))
  warp = jax.jit(augment.random_elastic, static_argnums=(2, 3))
  inner = (slice(None), slice(6, 22), slice(6, 22), 0)  # clear of the borders
  dx = (np.asarray(warp(ramp, keys(64), 34.0, 4.0)) - ramp)[inner] / 8.0
  noise = np.random.default_rng(0).uniform(-1, 1, (64, 28, 28))
  reference = 34.0 * np.stack([ndimage.gaussian_filter(n, 4.0, mode="constant", truncate=3.0)
                               for n in noise])[inner[:3]]
  assert dx.std() == pytest.approx(reference.std(), rel=0.25)
  assert 0.5 < np.abs(dx).mean() < 3.0  # pixels
  # Smooth: neighbours move alike, far less than the displacement itself.
  assert np.abs(np.diff(dx, axis=2)).mean() < 0.25 * np.abs(dx).mean()
  rough = (np.asarray(warp(ramp, keys(64), 34.0 / 4, 1.0)) - ramp)[inner] / 8.0
  assert np.abs(np.diff(rough, axis=2)).mean() > 2 * np.abs(np.diff(dx, axis=2)).mean()


@pytest.mark.parametrize("sigma", [1.0, 5.0, 10.0])  # 10: taps (61) longer than the image
def test_elastic_blur_is_scipy_s_at_every_sigma_the_config_allows(sigma):
  from scipy import ndimage

  ramp = np.broadcast_to(np.arange(28.0)[None, :, None], (8, 28, 28, 1))
  dx = np.asarray(augment.random_elastic(ramp, keys(8), 1.0, sigma) - ramp)[..., 0]
  noise = jax.vmap(lambda key: jax.random.uniform(key, (2, 28, 28), minval=-1.0,
                                                  maxval=1.0))(keys(8))[:, 1]
  reference = [ndimage.gaussian_filter(np.asarray(n, np.float64), sigma, mode="constant",
                                       truncate=3.0) for n in noise]
  # The ramp's columns are its values, so bilinear sampling returns the displacement itself;
  # zero-filled past the borders (and displaced by under a pixel), hence the inner ones only.
  inner = (slice(None), slice(2, 26), slice(2, 26))
  np.testing.assert_allclose(dx[inner], np.stack(reference)[inner], atol=1e-5)


def test_erasing_zeroes_one_rectangle_of_the_given_share():
  images = np.full((200, 28, 28, 1), 255, np.uint8)
  erase = jax.jit(augment.random_erasing, static_argnums=2)
  out = np.asarray(erase(images, keys(200), 1.0))
  for image in out[..., 0]:
    rows, cols = np.nonzero(image == 0)
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert rows.size == height * width  # one filled rectangle
    assert 0.01 < rows.size / 784 < 0.23
  half = np.asarray(erase(images, keys(200), 0.5))
  assert 0.35 < np.mean(np.any(half == 0, axis=(1, 2, 3))) < 0.65


def test_flips_mirror_left_to_right_with_the_given_chance():
  images = np.random.default_rng(0).integers(0, 256, (400, 28, 28, 1)).astype(np.uint8)
  flip = jax.jit(augment.random_flip, static_argnums=2)
  np.testing.assert_array_equal(flip(images, keys(400), 1.0), images[:, :, ::-1])
  half = np.asarray(flip(images, keys(400), 0.5))
  mirrored = np.all(half == images[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(mirrored | np.all(half == images, axis=(1, 2, 3)))  # each whole, or kept
  assert 0.4 < mirrored.mean() < 0.6


def test_flips_are_refused_for_digits_and_taken_for_clothes():
  config = dataclasses.asdict(ExperimentConfig(model=get_model_config("testing")))
  with pytest.raises(ValueError, match="config.augment_flip=0.5 must be 0 for mnist: a "
                                       "mirrored digit is another digit or none"):
    validate({**config, "augment_flip": 0.5})
  assert validate({**config, "augment_flip": 0.5, "dataset": "fashion_mnist"}).augment_flip == 0.5


@pytest.mark.parametrize("key,value", [("augment_max_rotation", 200.0),
                                       ("augment_max_scale", -0.1),
                                       ("random_erasing", 1.5),
                                       ("augment_flip", -0.5),
                                       ("augment_elastic_alpha", 150.0),
                                       ("augment_elastic_sigma", 0.5)])
def test_bad_augmentation_strengths_are_one_line_errors(key, value):
  config = dataclasses.asdict(ExperimentConfig(model=get_model_config("testing")))
  with pytest.raises(ValueError, match=f"config.{key}={value} must be in"):
    validate({**config, key: value})
