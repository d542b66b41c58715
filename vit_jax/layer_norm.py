"""LayerNorm's maths: standardise each token over its features, with a closed-form gradient.

Layer 1 of vit_jax: jax only, no parameters. `models.LayerNorm` owns the learned
scale and bias and applies them to `standardize`'s result.

Why not autodiff: XLA ran the op-by-op derivative of the mean and the variance (flax's
LayerNorm, or this function differentiated automatically, slower still) slower than the
closed form below, on a share of the `seed` training step worth winning back
(docs/performance.md has the figures). The price: a `jax.custom_vjp` is reverse-mode only,
so `jax.jvp`, `jax.jacfwd` and forward-over-reverse Hessian-vector products do not go through
the model; `jax.grad` of `jax.grad` does (with the einsum attention: the fused kernel has
first derivatives only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def standardize(x: jax.Array, epsilon: float = 1e-6) -> jax.Array:
  """(..., D) -> (..., D): each row minus its mean, over sqrt(its variance + epsilon)."""
  return _standardize_forward(x, epsilon)[0]


def _standardize_forward(x, epsilon):
  centred = x - jnp.mean(x, axis=-1, keepdims=True)
  inverse_std = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + epsilon)
  standardized = centred * inverse_std
  return standardized, (standardized, inverse_std)


def _standardize_backward(epsilon, residuals, cotangent):
  """d loss / dx = (g - mean(g) - y * mean(g * y)) / std, row by row, for y the output."""
  del epsilon  # already inside inverse_std
  standardized, inverse_std = residuals
  mean_cotangent = jnp.mean(cotangent, axis=-1, keepdims=True)
  mean_projection = jnp.mean(cotangent * standardized, axis=-1, keepdims=True)
  return (inverse_std * (cotangent - mean_cotangent - standardized * mean_projection),)


standardize.defvjp(_standardize_forward, _standardize_backward)
