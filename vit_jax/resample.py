"""Carrying a ViT's input parameters over to another patch grid, for fine-tuning.

Two maps, both pure functions of arrays:
- `resample_position_embedding`: the patches' embeddings seen as a (grid, grid) picture and
  resized bilinearly, the class token's kept as it is (as the ViT paper fine-tunes at
  another resolution);
- `resize_patch_kernel`: the patch projection for another patch size, chosen (FlexiViT's
  "PI-resize") so that a patch resized bilinearly to the new size projects to the same
  token as the old patch did: W' = pinv(Bᵀ) W, where B resizes a patch.

Layer 1 of vit_jax: jax, numpy and chex only.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np


def resample_position_embedding(pos: jax.Array, new_grid: int, num_prefix: int) -> jax.Array:
  """(1, P + g*g, D) -> (1, P + new_grid**2, D); P = num_prefix tokens (a class token) kept."""
  chex.assert_rank(pos, 3)
  prefix, grid_tokens = pos[:, :num_prefix], pos[:, num_prefix:]
  grid = int(round(grid_tokens.shape[1] ** 0.5))
  if grid * grid != grid_tokens.shape[1]:
    raise ValueError(f"{grid_tokens.shape[1]} position embeddings after {num_prefix} "
                     "prefix tokens do not form a square grid")
  width = pos.shape[-1]
  picture = grid_tokens.reshape(grid, grid, width)
  resized = jax.image.resize(picture, (new_grid, new_grid, width), method="bilinear")
  chex.assert_shape(resized, (new_grid, new_grid, width))
  return jnp.concatenate([prefix, resized.reshape(1, new_grid * new_grid, width)], axis=1)


def patch_resize_matrix(old: int, new: int) -> np.ndarray:
  """B, (new*new, old*old): B @ patch.ravel() is the patch resized bilinearly to new x new."""
  basis = np.eye(old * old, dtype=np.float32).reshape(old * old, old, old)
  resized = jax.vmap(lambda e: jax.image.resize(e, (new, new), method="bilinear"))(basis)
  return np.asarray(resized).reshape(old * old, new * new).T


def resize_patch_kernel(kernel: jax.Array, old: int, new: int, channels: int) -> jax.Array:
  """(old*old*C, D) -> (new*new*C, D), rows in patchify's (row, column, channel) order."""
  width = kernel.shape[-1]
  chex.assert_shape(kernel, (old * old * channels, width))
  pixels = kernel.reshape(old * old, channels * width)
  resize = patch_resize_matrix(old, new)
  resized = jnp.asarray(np.linalg.pinv(resize.T)) @ pixels
  chex.assert_shape(resized, (new * new, channels * width))
  return resized.reshape(new * new * channels, width)
