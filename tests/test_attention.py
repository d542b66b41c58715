"""The pure attention maths against numpy references written from the formulas."""

import chex
import jax
import jax.extend
import numpy as np
import pytest

from vit_jax import attention as A

RTOL = ATOL = 1e-5  # float32 throughout; einsum reordering stays well inside this


def rand(*shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --- Independent numpy references ------------------------------------------------------

def ref_split_heads(x, h):
  b, n, d = x.shape
  out = np.zeros((b, h, n, d // h), x.dtype)
  for head in range(h):
    out[:, head] = x[:, :, head * (d // h):(head + 1) * (d // h)]
  return out


def ref_attention(q, k, v, mask=None):
  dh = q.shape[-1]
  logits = q @ np.swapaxes(k, -1, -2) / np.sqrt(dh)
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  logits = logits - logits.max(-1, keepdims=True)
  w = np.exp(logits)
  w = w / w.sum(-1, keepdims=True)
  return w @ v, w


# --- Each function against its reference --------------------------------------------

def test_project_matches_matmul():
  x, w, b = rand(2, 5, 8), rand(8, 12, seed=1), rand(12, seed=2)
  np.testing.assert_allclose(A.project(x, w, b), x @ w + b, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(A.project(x, w), x @ w, rtol=RTOL, atol=ATOL)


def test_chunk_qkv_splits_in_order():
  qkv = rand(2, 5, 3 * 8)
  q, k, v = A.chunk_qkv(qkv)
  np.testing.assert_array_equal(q, qkv[..., :8])
  np.testing.assert_array_equal(k, qkv[..., 8:16])
  np.testing.assert_array_equal(v, qkv[..., 16:])


def test_split_heads_matches_reference_and_merge_inverts_it():
  x = rand(3, 7, 16)
  heads = A.split_heads(x, 4)
  np.testing.assert_array_equal(heads, ref_split_heads(x, 4))
  np.testing.assert_array_equal(A.merge_heads(heads), x)


def test_attend_matches_reference():
  q, k, v = rand(2, 4, 6, 8), rand(2, 4, 6, 8, seed=1), rand(2, 4, 6, 8, seed=2)
  out, weights = A.attend(q, k, v)
  ref_out, ref_w = ref_attention(q, k, v)
  np.testing.assert_allclose(weights, ref_w, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(out, ref_out, rtol=RTOL, atol=ATOL)


def test_attention_rows_sum_to_one():
  q, k = rand(2, 3, 9, 4) * 10, rand(2, 3, 9, 4, seed=1) * 10
  weights = A.attention_weights(q, k)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
  assert (weights >= 0).all()


def test_mask_blocks_what_it_should():
  q, k, v = rand(1, 2, 5, 4), rand(1, 2, 5, 4, seed=1), rand(1, 2, 5, 4, seed=2)
  mask = np.tril(np.ones((5, 5), bool))[None, None]  # causal: no attention to later keys
  out, weights = A.attend(q, k, v, mask)
  assert np.all(np.asarray(weights)[..., ~mask[0, 0]] == 0)
  ref_out, ref_w = ref_attention(q, k, v, mask)
  np.testing.assert_allclose(weights, ref_w, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(out, ref_out, rtol=RTOL, atol=ATOL)
  # A masked key's value cannot reach the output: change it, first query unchanged.
  v2 = v.copy()
  v2[:, :, 4] += 100.0
  np.testing.assert_allclose(A.attend(q, k, v2, mask)[0][:, :, 0], out[:, :, 0], atol=ATOL)


def test_a_mask_that_is_not_boolean_is_refused():
  # An additive mask (0 keep, -inf block) read as truth values would keep what it blocks.
  q, k = rand(1, 2, 5, 4), rand(1, 2, 5, 4, seed=1)
  additive = np.where(np.tril(np.ones((5, 5), bool)), 0.0, -np.inf)
  with pytest.raises(ValueError, match="mask has dtype float32: it must be boolean"):
    A.attention_weights(q, k, additive)


def test_a_mask_broadcasts_over_examples_and_heads():
  q, k = rand(3, 2, 5, 4), rand(3, 2, 5, 4, seed=1)
  causal = np.tril(np.ones((5, 5), bool))
  full = np.broadcast_to(causal, (3, 2, 5, 5))
  np.testing.assert_array_equal(A.attention_weights(q, k, causal),
                                A.attention_weights(q, k, full))
  per_example = np.ones((3, 1, 5, 5), bool)
  per_example[1, :, :, 3:] = False  # example 1 may not attend to keys 3 and 4
  weights = np.asarray(A.attention_weights(q, k, per_example))
  assert np.all(weights[1, :, :, 3:] == 0) and np.all(weights[[0, 2]] > 0)
  with pytest.raises(ValueError, match="broadcast"):
    A.attention_weights(q, k, np.ones((5, 4), bool))


def test_project_out_matches_reference():
  x, w, b = rand(2, 5, 8), rand(8, 8, seed=1), rand(8, seed=2)
  np.testing.assert_allclose(A.project_out(x, w, b), x @ w + b, rtol=RTOL, atol=ATOL)


# --- Shape assertions trip -------------------------------------------------------------

@pytest.mark.parametrize("call,check", [
    (lambda: A.patchify(rand(28, 28, 1), 7), "assert_rank"),                  # rank 3, not 4
    (lambda: A.project(rand(2, 5, 8), rand(9, 4)), "assert_axis_dimension"),  # D_in mismatch
    (lambda: A.project(rand(2, 5, 8), rand(8, 4), rand(5)), "assert_shape"),  # bias width
    (lambda: A.split_heads(rand(2, 5, 8, 1), 2), "assert_rank"),              # rank 4, not 3
    (lambda: A.attend(rand(2, 4, 6, 8), rand(2, 4, 5, 8), rand(2, 4, 6, 8)),  # N differs
     "assert_equal_shape"),
    (lambda: A.merge_heads(rand(2, 5, 8)), "assert_rank"),                    # rank 3, not 4
    (lambda: A.project_out(rand(2, 5, 8), rand(8, 4), rand(4)), "assert_shape"),  # not D -> D
    (lambda: A.self_attention(rand(2, 5), {"to_out": {}}, 2), "assert_rank"),  # no batch axis
])
def test_wrong_shapes_trip_chex(call, check):
  with pytest.raises(AssertionError, match=f"Assertion {check} failed"):
    call()


def test_split_heads_rejects_head_count_that_does_not_divide_width():
  with pytest.raises(ValueError, match="num_heads=3"):
    A.split_heads(rand(2, 5, 8), 3)


# --- The six steps composed ------------------------------------------------------------

def ref_self_attention(x, w_q, w_k, w_v, w_out, b_out, heads):
  """Multi-head attention from the formulas: per head h, softmax(Q_h K_h^T / sqrt(d)) V_h on
  the h-th slice of each projection, the heads concatenated, then W_out."""
  d = x.shape[-1] // heads
  outs, weights = [], []
  for h in range(heads):
    cols = slice(h * d, (h + 1) * d)
    out, w = ref_attention(x @ w_q[:, cols], x @ w_k[:, cols], x @ w_v[:, cols])
    outs.append(out)
    weights.append(w)
  return np.concatenate(outs, -1) @ w_out + b_out, np.stack(weights, 1)


def test_self_attention_fused_separate_and_identity_match_the_formulas():
  x = rand(2, 5, 16).astype(np.float64)
  w_qkv, w_out, b_out = rand(16, 48, seed=1), rand(16, 16, seed=2), rand(16, seed=3)
  w_q, w_k, w_v = np.split(w_qkv, 3, axis=1)
  to_out = {"kernel": w_out, "bias": b_out}
  fused = A.self_attention(x, {"to_qkv": {"kernel": w_qkv}, "to_out": to_out}, 4)
  separate = A.self_attention(x, {"to_q": {"kernel": w_q}, "to_k": {"kernel": w_k},
                                  "to_v": {"kernel": w_v}, "to_out": to_out}, 4)
  identity = A.self_attention(x, {"to_out": to_out}, 4)
  eye = np.eye(16)
  for got, want in ((fused, ref_self_attention(x, w_q, w_k, w_v, w_out, b_out, 4)),
                    (separate, ref_self_attention(x, w_q, w_k, w_v, w_out, b_out, 4)),
                    (identity, ref_self_attention(x, eye, eye, eye, w_out, b_out, 4))):
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[1], want[1], rtol=RTOL, atol=ATOL)


def test_self_attention_calls_the_attend_it_is_given():
  x, w_out = rand(1, 3, 4), {"kernel": np.eye(4, dtype=np.float32), "bias": np.zeros(4)}
  seen = []

  def copy_values(q, k, v, mask, compute_dtype):
    seen.append((q.shape, mask, compute_dtype))
    return v, np.zeros(q.shape[:-1] + (q.shape[-2],))

  out, _ = A.self_attention(x, {"to_out": w_out}, 2, "mask", copy_values, "bfloat16")
  assert seen == [((1, 2, 3, 2), "mask", "bfloat16")]
  np.testing.assert_allclose(out, x, rtol=1e-2)  # V = x, merged, through a bfloat16 identity


# --- The same numbers with and without jit, and under pmap ----------------------------

def full_attention(x, w_qkv, w_out, b_out):
  return A.self_attention(x, {"to_qkv": {"kernel": w_qkv},
                              "to_out": {"kernel": w_out, "bias": b_out}}, 4)


class TransformsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_same_outputs_under_each_transform(self):
    # chex's pmap variant runs the function on every (fake) device and returns the first's.
    self.assertGreaterEqual(jax.local_device_count(), 2, "conftest gives 8 fake CPU devices")
    x = rand(2, 5, 16)
    w_qkv, w_out, b_out = rand(16, 48, seed=1), rand(16, 16, seed=2), rand(16, seed=3)
    expected_out, expected_weights = full_attention(x, w_qkv, w_out, b_out)
    out, weights = self.variant(full_attention)(x, w_qkv, w_out, b_out)
    np.testing.assert_allclose(out, expected_out, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(weights, expected_weights, rtol=RTOL, atol=ATOL)
    ref_w = ref_attention(*(ref_split_heads(t, 4) for t in np.split(x @ w_qkv, 3, -1)))[1]
    np.testing.assert_allclose(weights, ref_w, rtol=RTOL, atol=ATOL)


# --- Mixed precision: bfloat16 operands, float32 accumulation, forward and backward ----

def round_to_bf16(x):
  return np.asarray(jax.numpy.asarray(x).astype(jax.numpy.bfloat16).astype(np.float32))


@pytest.mark.parametrize("subscripts,a_shape,b_shape", [
    ("bnd,de->bne", (2, 5, 8), (8, 3)),
    ("bhqd,bhkd->bhqk", (2, 3, 5, 4), (2, 3, 6, 4)),
    ("bhqk,bhkd->bhqd", (2, 3, 5, 6), (2, 3, 6, 4)),
])
def test_bfloat16_products_and_gradients_match_float32_on_rounded_operands(
    subscripts, a_shape, b_shape):
  a, b = rand(*a_shape), rand(*b_shape, seed=1)
  cotangent = rand(*np.einsum(subscripts, a, b).shape, seed=2)
  out, vjp = jax.vjp(lambda a, b: A.products(subscripts, a, b, jax.numpy.bfloat16), a, b)
  assert out.dtype == np.float32
  # The forward product is exact float32 arithmetic on the rounded operands.
  ra, rb = round_to_bf16(a), round_to_bf16(b)
  np.testing.assert_allclose(out, np.einsum(subscripts, ra, rb), rtol=1e-5, atol=1e-5)
  # The gradients round the cotangent too, then accumulate in float32.
  rg = round_to_bf16(cotangent)
  lhs, rest = subscripts.split(",")
  rhs, res = rest.split("->")
  grad_a, grad_b = vjp(cotangent)
  assert grad_a.dtype == grad_b.dtype == np.float32
  np.testing.assert_allclose(grad_a, np.einsum(f"{res},{rhs}->{lhs}", rg, rb),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_b, np.einsum(f"{lhs},{res}->{rhs}", ra, rg),
                             rtol=1e-5, atol=1e-5)
  # And they differ from float32's: the rounding is real, not skipped.
  assert not np.allclose(out, np.einsum(subscripts, a, b), rtol=1e-6, atol=1e-6)


def test_bfloat16_gradients_multiply_bfloat16_operands_only():
  # Plain autodiff of a bfloat16 product would multiply the float32 cotangent by a
  # rounded operand in float32, the slow path; every product of the gradient must not.
  def loss(x, w):
    return A.project(x, w, compute_dtype=jax.numpy.bfloat16).sum()

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(rand(2, 5, 8), rand(8, 3))
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  dots += [e for eqn in jaxpr.jaxpr.eqns for sub in jax.extend.core.jaxprs_in_params(eqn.params)
           for e in sub.eqns if e.primitive.name == "dot_general"]
  assert len(dots) >= 3  # forward, and the gradients of x and w
  for dot in dots:
    assert [v.aval.dtype for v in dot.invars] == [jax.numpy.bfloat16] * 2, dot


def test_float32_products_are_plain_einsum():
  a, b = rand(2, 5, 8), rand(8, 3, seed=1)
  for dtype in (None, np.float32):
    np.testing.assert_allclose(A.products("bnd,de->bne", a, b, dtype), a @ b, rtol=RTOL,
                               atol=ATOL)
    # One plain product: no custom VJP (reverse-mode only) where float32 needs none.
    jaxpr = jax.make_jaxpr(lambda a, b, d=dtype: A.products("bnd,de->bne", a, b, d))(a, b)
    assert [e.primitive.name for e in jaxpr.jaxpr.eqns] == ["dot_general"], jaxpr


def test_low_precision_products_reject_an_index_summed_in_one_operand():
  with pytest.raises(ValueError, match="subscripts='ij,jk->k'"):
    A.products("ij,jk->k", rand(2, 3), rand(3, 4), jax.numpy.bfloat16)


def test_bfloat16_attention_rows_still_sum_to_one():
  q, k = rand(2, 3, 5, 4), rand(2, 3, 5, 4, seed=1)
  weights = A.attention_weights(q, k, compute_dtype=jax.numpy.bfloat16)
  assert weights.dtype == np.float32
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
