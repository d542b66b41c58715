"""The fused kernel's bfloat16 products (AVX-512 BF16 builds) against a numpy reference that
rounds the same operands; on other builds, that a bfloat16 model leaves them float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import rand
from test_fused_attention import LIMITS, SHAPES, requires_kernel

from vit_jax.kernels import fused_attention as F


@pytest.fixture(scope="module")
def kernel():
  why = F.load()
  assert why is None, why
  return F



def _bf16(x):
  """x rounded to bfloat16 (to nearest, ties to even, as XLA's convert), back as float32."""
  return np.asarray(x, np.float32).astype(jnp.bfloat16).astype(np.float32)


def _reference_with_rounded_products(q, k, v, d_out):
  """(out, dq, dk, dv) of attention, each product's operands rounded to bfloat16 where the
  kernel rounds them (attention_cpu.cc's header), in float64: Q K^T of the scaled queries and
  K, and dO V^T; Q^T dS and P^T dO for heads of 8 or more; the unnormalised weights times V
  and dS K for heads of 4 and of 32 or more."""
  scale = np.float32(1 / np.sqrt(q.shape[-1]))
  same = lambda x: x  # noqa: E731
  by_key = _bf16 if q.shape[-1] == 4 or q.shape[-1] >= 32 else same
  by_query = _bf16 if q.shape[-1] >= 8 else same
  t = lambda x: np.swapaxes(x, -1, -2)  # noqa: E731
  queries = _bf16(q * scale).astype(np.float64)
  scores = queries @ t(_bf16(k))
  unnormalised = np.exp(scores - scores.max(-1, keepdims=True))
  total = unnormalised.sum(-1, keepdims=True)
  out = by_key(unnormalised) @ by_key(v) / total
  weights = unnormalised / total
  d_weights = _bf16(d_out) @ t(_bf16(v))
  d_scores = weights * (d_weights - (weights * d_weights).sum(-1, keepdims=True))
  dq = by_key(d_scores) @ by_key(k) * scale
  dk = t(by_query(d_scores)) @ (queries if q.shape[-1] >= 8 else q * scale)
  dv = t(by_query(weights)) @ by_query(d_out)
  return out, dq, dk, dv


def _kernel_results(q, k, v, d_out, rounded: bool):
  """(out, dq, dk, dv) from the kernel's two calls with bfloat16 products, each (B, H, N, D/H),
  the results float32 or (`rounded`) bfloat16."""
  qkv = jnp.stack([jnp.swapaxes(t, 1, 2) for t in (q, k, v)], axis=2)  # (B, N, 3, H, D/H)
  out, lse = F._kernel_call("VitAttentionForward", True, rounded, qkv)
  (dqkv,) = F._kernel_call("VitAttentionBackward", True, rounded, qkv, lse,
                           jnp.swapaxes(d_out, 1, 2))
  heads = [jnp.swapaxes(x, 1, 2) for x in (out, dqkv[:, :, 0], dqkv[:, :, 1], dqkv[:, :, 2])]
  return [np.asarray(x.astype(jnp.float32)) for x in heads]


BF16_SHAPES = [SHAPES[0], SHAPES[1], SHAPES[2], SHAPES[3], SHAPES[7], SHAPES[8], SHAPES[11],
               *SHAPES[12:], *LIMITS]


@requires_kernel
@pytest.mark.parametrize("shape", BF16_SHAPES)
def test_bf16_products_match_a_reference_rounding_the_same_operands(kernel, shape):
  if not kernel.bfloat16_products():
    pytest.skip("this build has no bfloat16 products (no AVX-512 BF16)")
  q, k, v, d_out = (rand(*shape, seed=s) for s in range(4))
  float32 = [np.asarray(x) for x in _float32_results(kernel, q, k, v, d_out)]
  bf16 = _kernel_results(q, k, v, d_out, rounded=False)
  for got, exact, want in zip(bf16, float32, _reference_with_rounded_products(q, k, v, d_out),
                              strict=True):
    # A float32 sum may round an unnormalised weight to the other side of a bfloat16 step
    # than float64 does (a few elements in 10^4): hence 1e-3, where the float32 results
    # differ from the reference by several times more.
    size = np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=1e-3 * size)
    assert np.abs(got - want).max() <= 0.3 * np.abs(exact - want).max()  # 0 for one token


def _float32_results(kernel, q, k, v, d_out):
  """(out, dq, dk, dv) of the kernel as a float32 model calls it."""
  def loss(q, k, v):
    out = kernel.attend(q, k, v, None, jnp.float32)[0]
    return jnp.sum(out * d_out), out
  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return (out, *grads)


@requires_kernel
@pytest.mark.parametrize("shape", BF16_SHAPES)
def test_a_bfloat16_model_gets_the_results_rounded_as_xla_rounds_them(kernel, shape):
  """Under a bfloat16 model the kernel rounds out and dQ, dK, dV to bfloat16 itself, which
  the products that read them would do: bit for bit XLA's rounding of its float32 results."""
  if not kernel.bfloat16_products():
    pytest.skip("this build has no bfloat16 products (no AVX-512 BF16)")
  q, k, v, d_out = (rand(*shape, seed=s) for s in range(4))
  unrounded = _kernel_results(q, k, v, d_out, rounded=False)
  rounded = _kernel_results(q, k, v, d_out, rounded=True)

  def run(round_results):
    def loss(q, k, v):
      out = kernel.attend(q, k, v, None, jnp.bfloat16, round_results)[0]
      return jnp.sum(out * d_out), out
    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, *grads

  for x, y, model, exact in zip(unrounded, rounded, run(True), run(False), strict=True):
    np.testing.assert_array_equal(y, _bf16(x))
    assert model.dtype == jnp.float32  # as attention.attend returns, and q, k, v are
    np.testing.assert_array_equal(model, y)
    np.testing.assert_array_equal(exact, x)  # round_results=False: the float32 results


@requires_kernel
def test_bfloat16_products_only_where_the_build_has_them(kernel):
  q, k, v = (rand(*SHAPES[0], seed=s) for s in range(3))
  attend = jax.jit(kernel.attend, static_argnums=(3, 4))
  float32 = np.asarray(attend(q, k, v, None, None)[0])
  np.testing.assert_array_equal(attend(q, k, v, None, jnp.float32)[0], float32)
  low = np.asarray(attend(q, k, v, None, jnp.bfloat16)[0])
  if kernel.bfloat16_products():  # AVX-512 BF16
    assert not np.array_equal(low, float32)
    np.testing.assert_allclose(low, float32, atol=3e-2)
  else:  # AVX2, or AVX-512 without BF16: the products stay float32
    np.testing.assert_array_equal(low, float32)
