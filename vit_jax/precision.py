"""How every matrix product of the model is computed: float32, or mixed precision.

`products` is a two-operand einsum; with a low `compute_dtype` (bfloat16) the operands are
rounded to it and the products, forward and backward, accumulate in float32.

Layer 1 of vit_jax: jax only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def products(subscripts: str, a: jax.Array, b: jax.Array, compute_dtype=None) -> jax.Array:
  """The two-operand einsum `subscripts` (e.g. 'bnd,de->bne'), optionally in low precision.

  Args:
    subscripts: 'lhs,rhs->out'; every index of one operand appears in the other or
      in the output (so the gradients are einsums of the same kind).
    a, b: the operands, any float dtype.
    compute_dtype: None or float32: a plain `jnp.einsum` with a float32 result, at JAX's
      default matmul precision: float32 on CPUs, but TF32 on recent NVIDIA GPUs and
      bfloat16 passes on TPUs (`jax_default_matmul_precision='highest'` for float32). A
      lower precision (bfloat16): `a` and `b` are rounded to it, the products
      accumulate in float32 and the result is float32; the gradients' products also
      take operands in `compute_dtype` (autodiff alone would multiply the float32
      cotangent by the rounded operand in float32, losing the speed of the
      low-precision path). That path is a `jax.custom_vjp`: reverse-mode only, so
      `jax.jvp`, `jax.jacfwd` and `jax.hessian` need float32.

  Returns:
    The einsum's result, float32.
  """
  if compute_dtype is None or jnp.dtype(compute_dtype) == jnp.float32:
    return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32)
  inputs, out = subscripts.replace(" ", "").split("->")
  lhs, rhs = inputs.split(",")
  for name, indices, others in (("first", lhs, rhs + out), ("second", rhs, lhs + out)):
    if any(i not in others for i in indices):
      raise ValueError(f"subscripts={subscripts!r}: the {name} operand has an index that "
                       "appears nowhere else, which low-precision products do not support")
  # Float32 in: the custom VJP's gradients then are float32, and the casts' own
  # derivatives take them back to whatever dtype `a` and `b` came in.
  return _low_precision_products(lhs, rhs, out, jnp.dtype(compute_dtype),
                                 a.astype(jnp.float32), b.astype(jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _low_precision_products(lhs: str, rhs: str, out: str, dtype, a: jax.Array,
                            b: jax.Array) -> jax.Array:
  return _low_precision_forward(lhs, rhs, out, dtype, a, b)[0]


def _low_precision_forward(lhs, rhs, out, dtype, a, b):
  low_a, low_b = a.astype(dtype), b.astype(dtype)
  result = jnp.einsum(f"{lhs},{rhs}->{out}", low_a, low_b, preferred_element_type=jnp.float32)
  return result, (low_a, low_b)  # the rounded operands: half the memory


def _low_precision_backward(lhs, rhs, out, dtype, residuals, cotangent):
  low_a, low_b = residuals
  cotangent = cotangent.astype(dtype)
  # The gradients accumulate in float32 and keep it: only the operands are rounded.
  grad_a = jnp.einsum(f"{out},{rhs}->{lhs}", cotangent, low_b,
                      preferred_element_type=jnp.float32)
  grad_b = jnp.einsum(f"{lhs},{out}->{rhs}", low_a, cotangent,
                      preferred_element_type=jnp.float32)
  return grad_a, grad_b


_low_precision_products.defvjp(_low_precision_forward, _low_precision_backward)
