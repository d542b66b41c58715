"""Position embeddings and patch projections carried to another patch grid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import resample


def test_the_class_token_is_kept_and_a_constant_grid_stays_constant():
  width = 8
  cls = jnp.arange(width, dtype=jnp.float32)[None, None]
  grid = jnp.full((1, 49, width), 0.5)
  out = resample.resample_position_embedding(jnp.concatenate([cls, grid], 1), 4, num_prefix=1)
  assert out.shape == (1, 17, width)
  np.testing.assert_array_equal(out[:, :1], cls)
  np.testing.assert_allclose(out[:, 1:], 0.5, rtol=1e-6)


def test_the_same_grid_is_the_identity():
  pos = jax.random.normal(jax.random.PRNGKey(0), (1, 50, 4))
  np.testing.assert_allclose(resample.resample_position_embedding(pos, 7, 1), pos, rtol=1e-6)


def test_a_grid_that_is_not_square_is_refused():
  with pytest.raises(ValueError, match="48 position embeddings .* not form a square grid"):
    resample.resample_position_embedding(jnp.zeros((1, 49, 4)), 4, num_prefix=1)


def test_the_resize_matrix_resizes_a_patch_as_jax_image_does():
  patch = np.random.default_rng(0).random((4, 4)).astype(np.float32)
  expected = jax.image.resize(patch, (7, 7), "bilinear")
  np.testing.assert_allclose(resample.patch_resize_matrix(4, 7) @ patch.ravel(),
                             np.asarray(expected).ravel(), rtol=1e-5, atol=1e-6)


def test_a_patch_resized_up_projects_to_the_same_token_through_the_resized_kernel():
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(4 * 4 * 2, 5)).astype(np.float32)  # 4x4 patches of 2 channels
  patch = rng.random((4, 4, 2)).astype(np.float32)
  bigger = jax.image.resize(patch, (7, 7, 2), "bilinear")  # patchify's (row, col, channel)
  new_kernel = resample.resize_patch_kernel(jnp.asarray(kernel), 4, 7, channels=2)
  assert new_kernel.shape == (7 * 7 * 2, 5)
  np.testing.assert_allclose(np.asarray(bigger).ravel() @ new_kernel, patch.ravel() @ kernel,
                             rtol=1e-4, atol=1e-4)
