"""The fused kernel reads Q, K and V where the fused projection `to_qkv` wrote them, and writes
their gradients as one array: chunking and splitting the heads move no data around it."""

import re

import jax
import jax.numpy as jnp
import pytest
from test_attention import rand
from test_fused_attention import requires_kernel

from vit_jax import models
from vit_jax.kernels import fused_attention as F
from vit_jax.model_configs import get_model_config


@pytest.fixture(scope="module")
def kernel():
  why = F.load()
  assert why is None, why
  return F


def _compiled_step(qkv: str, compute_dtype: str, **overrides) -> str:
  """The optimised HLO of a training step (forward and backward) of a ViT with the kernel."""
  config = get_model_config("testing", hidden_size=32, num_heads=2, qkv=qkv,
                            attention_kernel="fused_cpu", compute_dtype=compute_dtype,
                            **overrides)
  model = models.ViT(config)
  images = rand(3, 28, 28, 1)
  params = model.init(jax.random.PRNGKey(0), images)["params"]
  step = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, images) ** 2)))
  hlo = step.lower(params).compile().as_text()
  assert "VitAttentionBackward" in hlo  # the kernel's step, not the einsum's
  return hlo


def _copies_in_attention(qkv: str, compute_dtype: str) -> list[str]:
  """The slices and concatenations inside the attention modules of a compiled training step
  (forward and backward) of a ViT with the kernel. (Not XLA's copies: one transposes the
  gradient of `to_qkv`'s result for its weight's gradient, as it did before the kernel.)"""
  return re.findall(r"= \S+ (?:slice|concatenate)\(.*op_name=\"[^\"]*/attention/",
                    _compiled_step(qkv, compute_dtype))


@requires_kernel
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_the_fused_projection_s_q_k_v_are_not_copied_for_the_kernel(kernel, compute_dtype):
  assert _copies_in_attention("fused", compute_dtype) == []
  # With W_Q, W_K, W_V apart, Q, K and V are concatenated for the kernel and dQ, dK, dV
  # sliced out again: the check sees copies where there are some.
  assert len(_copies_in_attention("separate", compute_dtype)) >= 2


@requires_kernel
@pytest.mark.parametrize("qkv, qkv_bias, rounded", [
    ("fused", False, True), ("separate", False, True), ("tied_qk", False, True),
    ("identity_q", False, False), ("identity", False, False), ("separate", True, False)])
def test_the_kernel_rounds_the_gradients_only_where_products_read_them(kernel, qkv, qkv_bias,
                                                                        rounded):
  """Under a bfloat16 model the kernel's dQ, dK, dV come out in bfloat16 where each goes
  straight into a projection's product; where one is the tokens' own gradient or a bias's,
  they stay float32, as on the einsum path."""
  if not kernel.bfloat16_products():
    pytest.skip("this build has no bfloat16 products (no AVX-512 BF16)")
  hlo = _compiled_step(qkv, "bfloat16", qkv_bias=qkv_bias)
  dtypes = set(re.findall(r"= \(?(\w+)\[[^=]*custom_call_target=\"VitAttentionBackward\"", hlo))
  assert dtypes == {"bf16" if rounded else "f32"}


@requires_kernel
def test_the_kernel_refuses_an_array_that_is_not_q_k_v_side_by_side(kernel):
  not_packed = jnp.zeros((2, 5, 2, 1, 16))  # (B, N, 2, H, D/H): no V
  with pytest.raises(Exception, match=r"qkv is not \(\.\.\., n, 3, h, d\)"):
    jax.block_until_ready(F._kernel_call("VitAttentionForward", False, False, not_packed))


def _call_with_results(target: str, results, *arrays):
  shapes = tuple(jax.ShapeDtypeStruct(r, jnp.float32) for r in results)
  return jax.block_until_ready(jax.ffi.ffi_call(target, shapes)(*arrays, bf16=False))


@requires_kernel
@pytest.mark.parametrize("target, results, message", [
    ("VitAttentionForward", [(2, 4, 1, 16), (2, 1, 5)], r"out is not \(\.\.\., n, h, d\)"),
    ("VitAttentionForward", [(2, 5, 1, 16), (2, 5, 1)], r"lse is not \(\.\.\., h, n\)"),
    ("VitAttentionBackward", [(2, 5, 3, 1, 8)], r"dqkv is not shaped as qkv"),
])
def test_the_kernel_refuses_results_shaped_for_another_input(kernel, target, results, message):
  # The results' shapes are the caller's word: one too small would be written past its end.
  qkv = jnp.zeros((2, 5, 3, 1, 16))
  inputs = (qkv,) if target == "VitAttentionForward" else (
      qkv, jnp.zeros((2, 1, 5)), jnp.zeros((2, 5, 1, 16)))
  with pytest.raises(Exception, match=message):
    _call_with_results(target, results, *inputs)
