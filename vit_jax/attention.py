"""The maths of a Vision Transformer's attention, as pure shape-checked functions.

Layer 1 of vit_jax: jax, numpy and chex only, no parameters, no Flax. Modules in
`vit_jax.models` own the weights and call these functions in the order a reader
meets them here:

    patchify       (B, H, W, C)      -> (B, N, P*P*C)
    project        (B, N, D_in)      -> (B, N, D_out)      x @ W (+ b)
    chunk_qkv      (B, N, 3*D)       -> 3 x (B, N, D)      fused projection only
    split_heads    (B, N, D)         -> (B, H, N, D/H)     reshape, then transpose
    attend         3 x (B, H, N, D/H) -> (B, H, N, D/H), weights (B, H, N, N)
    merge_heads    (B, H, N, D/H)    -> (B, N, D)          transpose, then reshape
    project_out    (B, N, D)         -> (B, N, D)          x @ W_out + b_out

B is the batch, N the number of tokens, D the width, H the number of heads.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """Cuts images into non-overlapping square patches, each flattened.

  Args:
    images: (B, H, W, C), with H and W multiples of `patch_size`.
    patch_size: side P of a square patch.

  Returns:
    (B, N, P*P*C) with N = (H/P) * (W/P), patches in row-major order and each
    patch flattened as (row, column, channel).
  """
  chex.assert_rank(images, 4)
  batch, height, width, channels = images.shape
  if height % patch_size or width % patch_size:
    raise ValueError(
        f"patch_size={patch_size} does not divide the image size {height}x{width}")
  rows, cols = height // patch_size, width // patch_size
  patches = images.reshape(batch, rows, patch_size, cols, patch_size, channels)
  chex.assert_shape(patches, (batch, rows, patch_size, cols, patch_size, channels))
  patches = patches.transpose(0, 1, 3, 2, 4, 5)
  chex.assert_shape(patches, (batch, rows, cols, patch_size, patch_size, channels))
  patches = patches.reshape(batch, rows * cols, patch_size * patch_size * channels)
  chex.assert_shape(patches, (batch, rows * cols, patch_size * patch_size * channels))
  return patches


def project(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """The linear projection x @ W (+ b) applied to every token.

  Args:
    x: (B, N, D_in).
    kernel: (D_in, D_out).
    bias: (D_out,) or None.

  Returns:
    (B, N, D_out).
  """
  chex.assert_rank(x, 3)
  chex.assert_rank(kernel, 2)
  batch, tokens, d_in = x.shape
  d_out = kernel.shape[1]
  chex.assert_axis_dimension(kernel, 0, d_in)
  y = jnp.einsum("bnd,de->bne", x, kernel)
  if bias is not None:
    chex.assert_shape(bias, (d_out,))
    y = y + bias
  chex.assert_shape(y, (batch, tokens, d_out))
  return y


def chunk_qkv(qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Chunks the output of the fused `to_qkv` projection into Q, K and V.

  Args:
    qkv: (B, N, 3*D), the concatenation [Q | K | V] along the last axis.

  Returns:
    q, k, v, each (B, N, D).
  """
  chex.assert_rank(qkv, 3)
  batch, tokens, three_d = qkv.shape
  if three_d % 3:
    raise ValueError(f"fused qkv width {three_d} is not a multiple of 3")
  q, k, v = jnp.split(qkv, 3, axis=-1)
  for t in (q, k, v):
    chex.assert_shape(t, (batch, tokens, three_d // 3))
  return q, k, v


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """Splits the width into heads: reshape (B, N, H, D/H), then transpose.

  Args:
    x: (B, N, D), D a multiple of `num_heads`.
    num_heads: H.

  Returns:
    (B, H, N, D/H).
  """
  chex.assert_rank(x, 3)
  batch, tokens, width = x.shape
  if width % num_heads:
    raise ValueError(f"num_heads={num_heads} does not divide the width {width}")
  head_dim = width // num_heads
  x = x.reshape(batch, tokens, num_heads, head_dim)
  chex.assert_shape(x, (batch, tokens, num_heads, head_dim))
  x = x.transpose(0, 2, 1, 3)
  chex.assert_shape(x, (batch, num_heads, tokens, head_dim))
  return x


def attention_weights(q: jax.Array, k: jax.Array,
                      mask: jax.Array | None = None) -> jax.Array:
  """softmax(Q K^T / sqrt(D/H)) for every head.

  Args:
    q: (B, H, N, D/H) queries.
    k: (B, H, N, D/H) keys.
    mask: optional boolean array broadcastable to (B, H, N, N); False entries
      get zero weight. A row with no True entry gets uniform weights.

  Returns:
    (B, H, N, N); each row (fixed query) sums to 1 over the keys.
  """
  chex.assert_rank([q, k], 4)
  chex.assert_equal_shape([q, k])
  batch, heads, tokens, head_dim = q.shape
  # Softmax in float32 even for bf16 inputs: the exponent is where precision goes.
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k,
                      preferred_element_type=jnp.float32) / jnp.sqrt(head_dim)
  chex.assert_shape(logits, (batch, heads, tokens, tokens))
  if mask is not None:
    chex.assert_rank(mask, 4)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  chex.assert_shape(weights, (batch, heads, tokens, tokens))
  return weights


def attend(q: jax.Array, k: jax.Array, v: jax.Array,
           mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Scaled dot-product attention per head.

  Args:
    q, k, v: (B, H, N, D/H) each.
    mask: optional boolean, broadcastable to (B, H, N, N); see `attention_weights`.

  Returns:
    out: (B, H, N, D/H), the weighted sums of the values.
    weights: (B, H, N, N), the attention distribution of every query.
  """
  chex.assert_rank([q, k, v], 4)
  chex.assert_equal_shape([q, k, v])
  weights = attention_weights(q, k, mask)
  out = jnp.einsum("bhqk,bhkd->bhqd", weights, v)
  chex.assert_equal_shape([out, q])
  return out, weights


def merge_heads(x: jax.Array) -> jax.Array:
  """Joins the heads back into the width: transpose (B, N, H, D/H), then reshape.

  Args:
    x: (B, H, N, D/H).

  Returns:
    (B, N, D) with D = H * D/H; the inverse of `split_heads`.
  """
  chex.assert_rank(x, 4)
  batch, heads, tokens, head_dim = x.shape
  x = x.transpose(0, 2, 1, 3)
  chex.assert_shape(x, (batch, tokens, heads, head_dim))
  x = x.reshape(batch, tokens, heads * head_dim)
  chex.assert_shape(x, (batch, tokens, heads * head_dim))
  return x


def project_out(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """The output projection `to_out`: (B, N, D) -> (B, N, D), with bias."""
  chex.assert_rank(x, 3)
  chex.assert_shape(kernel, (x.shape[-1], x.shape[-1]))
  return project(x, kernel, bias)
