"""The maths of a Vision Transformer's attention, as pure shape-checked functions.

Layer 1 of vit_jax: jax, numpy and chex only, no parameters, no Flax. Modules in
`vit_jax.models` own the weights and call these functions in the order a reader
meets them here:

    patchify       (B, H, W, C)      -> (B, N, K*K*C)      K = P, or P + 2 overlap
    project        (B, N, D_in)      -> (B, N, D_out)      x @ W (+ b)
    chunk_qkv      (B, N, 3*D)       -> 3 x (B, N, D)      fused projection only
    split_heads    (B, N, D)         -> (B, H, N, D/H)     reshape, then transpose
    attend         3 x (B, H, N, D/H) -> (B, H, N, D/H), weights (B, H, N, N)
    merge_heads    (B, H, N, D/H)    -> (B, N, D)          transpose, then reshape
    project_out    (B, N, D)         -> (B, N, D)          x @ W_out + b_out

    self_attention (B, N, D)         -> (B, N, D), weights  the six steps above, in order
    attend_heads   (B, N, D)         -> (B, H, N, D/H), weights  its first four steps
    remove_heads   (B, H, N, D/H)    -> (B, H, N, D/H)     head ablation, before merge_heads

B is the batch, N the number of tokens, D the width, H the number of heads.

Every matrix product here goes through `products` (`vit_jax.precision`), which by default
is `jnp.einsum` in float32; with `compute_dtype=jnp.bfloat16` (mixed precision) the operands are
rounded to bfloat16 and the products, forward and backward, accumulate in float32.
(A plug-in kernel from `vit_jax.kernels` may replace `attend` in `self_attention`; its
products are its own.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.precision import products  # every matrix product below, in one precision


def patchify(images: jax.Array, patch_size: int, overlap: int = 0) -> jax.Array:
  """Cuts images into square patches on a grid of `patch_size` cells, each flattened.

  Args:
    images: (B, H, W, C), with H and W multiples of `patch_size`.
    patch_size: side P of a grid cell; there are (H/P) * (W/P) patches whatever the overlap.
    overlap: pixels each patch reaches past its cell on every side, so that neighbours share
      a border; the image is padded with copies of its edge pixels for the outer patches.

  Returns:
    (B, N, K*K*C) with N = (H/P) * (W/P) and K = P + 2 * overlap, patches in row-major
    order and each patch flattened as (row, column, channel).
  """
  chex.assert_rank(images, 4)
  _require_positive_int("patch_size", patch_size)
  batch, height, width, channels = images.shape
  if height % patch_size or width % patch_size:
    raise ValueError(
        f"patch_size={patch_size} does not divide the image size {height}x{width}")
  if overlap < 0:
    raise ValueError(f"overlap={overlap} must be at least 0")
  rows, cols, side = height // patch_size, width // patch_size, patch_size + 2 * overlap
  if overlap:  # a gather of overlapping windows; without overlap, a reshape does it
    padded = jnp.pad(images, ((0, 0), (overlap, overlap), (overlap, overlap), (0, 0)), "edge")
    row_pixels = patch_size * jnp.arange(rows)[:, None] + jnp.arange(side)  # (rows, side)
    col_pixels = patch_size * jnp.arange(cols)[:, None] + jnp.arange(side)  # (cols, side)
    patches = padded[:, row_pixels[:, None, :, None], col_pixels[None, :, None, :]]
  else:
    patches = images.reshape(batch, rows, side, cols, side, channels)
    chex.assert_shape(patches, (batch, rows, side, cols, side, channels))
    patches = patches.transpose(0, 1, 3, 2, 4, 5)
  chex.assert_shape(patches, (batch, rows, cols, side, side, channels))
  patches = patches.reshape(batch, rows * cols, side * side * channels)
  chex.assert_shape(patches, (batch, rows * cols, side * side * channels))
  return patches


def project(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
            compute_dtype=None) -> jax.Array:
  """The linear projection x @ W (+ b) of every token: x (B, N, D_in), kernel (D_in, D_out),
  optional bias (D_out,) -> (B, N, D_out); `compute_dtype`: the product's precision (`products`).
  """
  chex.assert_rank(x, 3)
  chex.assert_rank(kernel, 2)
  batch, tokens, d_in = x.shape
  d_out = kernel.shape[1]
  chex.assert_axis_dimension(kernel, 0, d_in)
  y = products("bnd,de->bne", x, kernel, compute_dtype)
  if bias is not None:
    chex.assert_shape(bias, (d_out,))
    y = y + bias
  chex.assert_shape(y, (batch, tokens, d_out))
  return y


def chunk_qkv(qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Chunks the fused `to_qkv` projection's output (B, N, 3*D), the concatenation [Q | K | V]
  along the last axis, into q, k, v, each (B, N, D)."""
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
  _require_positive_int("num_heads", num_heads)
  batch, tokens, width = x.shape
  if width % num_heads:
    raise ValueError(f"num_heads={num_heads} does not divide the width {width}")
  head_dim = width // num_heads
  x = x.reshape(batch, tokens, num_heads, head_dim)
  chex.assert_shape(x, (batch, tokens, num_heads, head_dim))
  x = x.transpose(0, 2, 1, 3)
  chex.assert_shape(x, (batch, num_heads, tokens, head_dim))
  return x


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array | None = None,
                      compute_dtype=None) -> jax.Array:
  """softmax(Q K^T / sqrt(D/H)) for every head.

  Args:
    q: (B, H, N, D/H) queries.
    k: (B, H, N, D/H) keys.
    mask: optional boolean array broadcastable to (B, H, N, N); False entries
      get zero weight. A row with no True entry gets uniform weights.
    compute_dtype: the precision of the product Q K^T (see `products`).

  Returns:
    (B, H, N, N), float32; each row (fixed query) sums to 1 over the keys.
  """
  chex.assert_rank([q, k], 4)
  chex.assert_equal_shape([q, k])
  batch, heads, tokens, head_dim = q.shape
  # Softmax in float32 even for low-precision products: the exponent is where precision goes.
  logits = products("bhqd,bhkd->bhqk", q, k, compute_dtype) / jnp.sqrt(head_dim)
  chex.assert_shape(logits, (batch, heads, tokens, tokens))
  if mask is not None:
    if jnp.asarray(mask).dtype != jnp.bool_:  # an additive 0 / -inf mask would mean the opposite
      raise ValueError(f"mask has dtype {jnp.asarray(mask).dtype}: it must be boolean, True "
                       "where a query may attend to a key")
    mask = jnp.broadcast_to(mask, logits.shape)  # e.g. one (N, N) mask for every example
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  chex.assert_shape(weights, (batch, heads, tokens, tokens))
  return weights


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
           compute_dtype=None) -> tuple[jax.Array, jax.Array]:
  """Scaled dot-product attention per head.

  Args:
    q, k, v: (B, H, N, D/H) each.
    mask: optional boolean, broadcastable to (B, H, N, N); see `attention_weights`.
    compute_dtype: the precision of both products (see `products`).

  Returns:
    out: (B, H, N, D/H), the weighted sums of the values.
    weights: (B, H, N, N), the attention distribution of every query.
  """
  chex.assert_rank([q, k, v], 4)
  chex.assert_equal_shape([q, k, v])
  weights = attention_weights(q, k, mask, compute_dtype)
  out = products("bhqk,bhkd->bhqd", weights, v, compute_dtype)
  chex.assert_equal_shape([out, q])
  return out, weights


def merge_heads(x: jax.Array) -> jax.Array:
  """Joins the heads back into the width: x (B, H, N, D/H), transposed (B, N, H, D/H), then
  reshaped (B, N, D) with D = H * D/H; the inverse of `split_heads`."""
  chex.assert_rank(x, 4)
  batch, heads, tokens, head_dim = x.shape
  x = x.transpose(0, 2, 1, 3)
  chex.assert_shape(x, (batch, tokens, heads, head_dim))
  x = x.reshape(batch, tokens, heads * head_dim)
  chex.assert_shape(x, (batch, tokens, heads * head_dim))
  return x


def remove_heads(x: jax.Array, head_mask: jax.Array, head_means: jax.Array | None = None
                 ) -> jax.Array:
  """Replaces the outputs of the heads whose `head_mask` entry is 0 (head ablation): by
  zeros, or by `head_means` (mean-ablation: what the head adds on average stays, only what
  it adds for this image goes).

  Args:
    x: (B, H, N, D/H), the heads' outputs before `merge_heads`.
    head_mask: (H,), 1 for a head kept, 0 for a head removed.
    head_means: optional (H, N, D/H), each head's mean output (`instruments.head_means`).

  Returns:
    (B, H, N, D/H).
  """
  chex.assert_rank(x, 4)
  chex.assert_shape(head_mask, (x.shape[1],))
  keep = head_mask.astype(x.dtype)[None, :, None, None]
  if head_means is None:
    return x * keep
  chex.assert_shape(head_means, x.shape[1:])
  return x * keep + (1 - keep) * head_means.astype(x.dtype)[None]


def project_out(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                compute_dtype=None) -> jax.Array:
  """The output projection `to_out`: x (B, N, D) @ kernel (D, D) + bias (D,) -> (B, N, D)."""
  chex.assert_rank(x, 3)
  chex.assert_shape(kernel, (x.shape[-1], x.shape[-1]))
  return project(x, kernel, bias, compute_dtype)


def attend_heads(x: jax.Array, weights: Mapping[str, Mapping[str, jax.Array]],
                 num_heads: int, mask: jax.Array | None = None,
                 attend_fn: Callable[..., tuple[jax.Array, jax.Array]] = attend,
                 compute_dtype=None) -> tuple[jax.Array, jax.Array]:
  """The first four steps of `self_attention`: project, chunk, split heads, attend.

  Returns each head's output (B, H, N, D/H), before the heads merge, and the attention
  weights (B, H, N, N). The arguments are `self_attention`'s.
  """
  chex.assert_rank(x, 3)
  _check_projection_names(weights)
  if "to_qkv" in weights:
    q, k, v = chunk_qkv(project(x, **weights["to_qkv"], compute_dtype=compute_dtype))
  else:  # each of Q, K, V projected where its matrix is given, else the tokens themselves
    q, k, v = (project(x, **weights[f"to_{t}"], compute_dtype=compute_dtype)
               if f"to_{t}" in weights else x for t in "qkv")
  q, k, v = (split_heads(t, num_heads) for t in (q, k, v))
  return attend_fn(q, k, v, mask, compute_dtype)


def _check_projection_names(weights: Mapping[str, object]) -> None:
  """A misspelt name would make its projection the identity without a word."""
  known = ("to_qkv", "to_q", "to_k", "to_v", "to_out")
  unknown = sorted(set(weights) - set(known))
  if unknown:
    raise ValueError(f"weights[{unknown[0]!r}] is not one of {', '.join(map(repr, known))}")
  separate = [name for name in ("to_q", "to_k", "to_v") if name in weights]
  if "to_qkv" in weights and separate:
    raise ValueError(f"weights has 'to_qkv' and {separate[0]!r}: the fused projection or "
                     "the separate ones, not both")


def _require_positive_int(name: str, value: object) -> None:
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive integer")


def self_attention(x: jax.Array, weights: Mapping[str, Mapping[str, jax.Array]],
                   num_heads: int, mask: jax.Array | None = None,
                   attend_fn: Callable[..., tuple[jax.Array, jax.Array]] = attend,
                   compute_dtype=None, head_mask: jax.Array | None = None,
                   head_means: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Multi-head self-attention: project, chunk, split heads, attend, merge heads, project out.

  Args:
    x: (B, N, D) tokens.
    weights: the projections, each {'kernel': (D_in, D_out), optional 'bias': (D_out,)} as
      a Flax `params` tree holds them. 'to_qkv' (D -> 3D) is the fused projection, then
      chunked; or 'to_q', 'to_k', 'to_v' (D -> D each) are W_Q, W_K, W_V, and where one
      is missing that one is x itself (with none, Q = K = V = x: the no-projection
      ablation). 'to_out' (D -> D, with bias) is required.
    num_heads: H, dividing D.
    mask: optional boolean, broadcastable to (B, H, N, N); see `attention_weights`.
    attend_fn: the implementation of step 4, called as `attend` is (the default); e.g.
      `vit_jax.kernels.attend_function('fused_cpu')`.
    compute_dtype: the precision of the products (see `products`).
    head_mask: optional (H,): heads whose entry is 0 are removed (`remove_heads`).
    head_means: optional (H, N, D/H), with `head_mask`: removed heads output these instead
      of zeros (mean-ablation).

  Returns:
    out: (B, N, D), and the attention weights: (B, H, N, N).
  """
  if head_means is not None and head_mask is None:
    raise ValueError("head_means applies to the heads a head_mask removes; no head_mask given")
  out, attention = attend_heads(x, weights, num_heads, mask, attend_fn, compute_dtype)
  if head_mask is not None:
    out = remove_heads(out, head_mask, head_means)
  out = merge_heads(out)
  chex.assert_shape(out, x.shape)
  to_out = weights["to_out"]
  return project_out(out, to_out["kernel"], to_out["bias"], compute_dtype), attention
