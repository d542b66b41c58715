"""The fused CPU attention kernel against numpy and against `attention.attend`."""

import re
import shutil
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import rand, ref_attention

from vit_jax import attention as A
from vit_jax import fused_attention as F
from vit_jax import models
from vit_jax.model_configs import get_model_config


def _cpu_has_avx512() -> bool:
  try:
    return " avx512f" in Path("/proc/cpuinfo").read_text()
  except OSError:
    return False


# The kernel is written for AVX-512 and built with g++; where both are present it must build,
# so that a kernel that stopped compiling fails here instead of falling back unseen.
requires_kernel = pytest.mark.skipif(
    not (_cpu_has_avx512() and shutil.which("g++")), reason="needs AVX-512 and g++")


@pytest.fixture(scope="module")
def kernel():
  why = F.load()
  assert why is None, why
  return F


def _uses_kernel(fn, *args) -> bool:
  return "VitAttention" in jax.jit(fn).lower(*args).as_text()


SHAPES = [(2, 4, 50, 16),   # the seed's heads
          (3, 2, 17, 32),   # the fast config's
          (1, 1, 128, 64),  # the largest supported
          (2, 3, 5, 16),    # fewer tokens than a vector's 16 lanes
          (16, 4, 50, 16)]  # 64 heads: shared out over XLA's threads in chunks of 8


@requires_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_values_match_numpy(kernel, shape):
  q, k, v = (rand(*shape, seed=s) * 2 for s in range(3))  # logits spread over a few units
  out, weights = jax.jit(kernel.attend)(q, k, v)
  ref_out, ref_weights = ref_attention(q.astype(np.float64), k.astype(np.float64),
                                       v.astype(np.float64))
  np.testing.assert_allclose(weights, ref_weights, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
  assert _uses_kernel(kernel.attend, q, k, v)


@requires_kernel
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[4]])
@pytest.mark.parametrize("reads", ["out", "weights", "both"])
def test_gradients_match_autodiff_of_attend(kernel, shape, reads):
  q, k, v = (rand(*shape, seed=s) for s in range(3))
  g_out, g_weights = rand(*shape, seed=3), rand(*shape[:-1], shape[-2], seed=4)

  def loss(attend):
    def value(q, k, v):
      out, weights = attend(q, k, v)
      total = 0.0
      if reads in ("out", "both"):
        total += jnp.sum(out * g_out)
      if reads in ("weights", "both"):  # the weights' own cotangent: a second kernel
        total += jnp.sum(weights * g_weights)
      return total
    return value

  fused = jax.jit(jax.grad(loss(kernel.attend), argnums=(0, 1, 2)))(q, k, v)
  expected = jax.grad(loss(A.attend), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(fused, expected, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert _uses_kernel(jax.grad(loss(kernel.attend)), q, k, v)


@requires_kernel
def test_vmap_and_pmap_give_the_same_values(kernel):
  q, k, v = (rand(4, 2, 3, 17, 16, seed=s) for s in range(3))
  batched = jax.vmap(kernel.attend)(q, k, v)
  mapped = jax.pmap(kernel.attend)(q, k, v)  # four of the conftest's eight CPU devices
  for i in range(4):
    one = kernel.attend(q[i], k[i], v[i])
    for got in (batched, mapped):
      np.testing.assert_allclose(got[0][i], one[0], rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(got[1][i], one[1], rtol=1e-6, atol=1e-6)


@requires_kernel
def test_model_with_the_kernel_equals_the_einsum_model(kernel):
  config = get_model_config("testing", hidden_size=32, num_heads=2)  # heads of 16, 17 tokens
  fused_config = get_model_config("testing", hidden_size=32, num_heads=2,
                                  attention_kernel="fused_cpu")
  images = rand(3, 28, 28, 1)
  labels = jnp.array([1, 2, 3])
  params = models.ViT(config).init(jax.random.PRNGKey(0), images)["params"]
  # A random head: the zero-initialised one would hide the attention from the logits.
  params["head"]["kernel"] = jnp.asarray(rand(32, 10, seed=7))

  def loss(model, params):
    logits, state = model.apply({"params": params}, images, mutable=["intermediates"])
    xent = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), labels])
    return xent, (logits, models.attention_maps(state["intermediates"]))

  (xent, (logits, maps)), grads = jax.value_and_grad(
      lambda p: loss(models.ViT(config), p), has_aux=True)(params)
  (f_xent, (f_logits, f_maps)), f_grads = jax.jit(jax.value_and_grad(
      lambda p: loss(models.ViT(fused_config), p), has_aux=True))(params)
  np.testing.assert_allclose(f_logits, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(f_maps, maps, rtol=1e-5, atol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         f_grads, grads)
  assert _uses_kernel(lambda p: loss(models.ViT(fused_config), p)[0], params)


def test_unsupported_shapes_use_attend():
  q, k, v = (rand(2, 2, 9, 8, seed=s) for s in range(3))  # head dim 8: not the kernel's
  assert not F.supports(9, 8)
  assert not _uses_kernel(F.attend, q, k, v)
  for got, want in zip(F.attend(q, k, v), A.attend(q, k, v), strict=True):
    np.testing.assert_allclose(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("overrides,message", [
    ({"compute_dtype": "bfloat16"}, "needs compute_dtype='float32'"),
    ({"hidden_size": 16}, "not 8 and 17"),           # heads of 8
    ({"patch_size": 2}, "not 16 and 197"),           # 196 patches + the class token
    ({"attention_kernel": "xla"}, "is not one of 'einsum', 'fused_cpu'"),
])
def test_config_rejects_what_the_kernel_cannot_do(overrides, message):
  fields = {"hidden_size": 32, "num_heads": 2, "attention_kernel": "fused_cpu", **overrides}
  with pytest.raises(ValueError, match=re.escape(message)) as error:
    get_model_config("testing", **fields)
  assert "attention_kernel" in str(error.value) and "\n" not in str(error.value)


def test_mask_is_rejected_by_the_fused_module():
  module = models.MultiHeadSelfAttention(2, attention_kernel="fused_cpu")
  x = rand(1, 5, 32)
  with pytest.raises(ValueError, match="takes no mask"):
    module.init(jax.random.PRNGKey(0), x, mask=jnp.ones((5, 5), bool))


@pytest.fixture
def unbuildable(monkeypatch, tmp_path):
  """No kernel in the cache and no compiler: `load` must report why."""
  monkeypatch.setenv("VIT_JAX_CACHE_DIR", str(tmp_path))
  monkeypatch.setenv("CXX", "no-such-compiler")
  F.load.cache_clear()
  F._warn_once.cache_clear()
  yield
  F.load.cache_clear()  # the next load finds the kernel again (targets stay registered)


def test_without_a_compiler_attend_warns_once_and_uses_the_einsum_path(unbuildable):
  q, k, v = (rand(2, 2, 17, 16, seed=s) for s in range(3))
  with pytest.warns(UserWarning, match="no C\\+\\+ compiler 'no-such-compiler'"):
    out, weights = F.attend(q, k, v)
  want_out, want_weights = A.attend(q, k, v)
  np.testing.assert_allclose(out, want_out, rtol=0, atol=0)
  np.testing.assert_allclose(weights, want_weights, rtol=0, atol=0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    F.attend(q, k, v)  # the second call stays quiet


def test_a_failing_compiler_is_reported_with_its_error(monkeypatch, tmp_path):
  compiler = tmp_path / "cxx"
  compiler.write_text("#!/bin/sh\necho 'attention_cpu.cc:1: error: no AVX-512 here' >&2\n"
                      "exit 1\n")
  compiler.chmod(0o755)
  monkeypatch.setenv("VIT_JAX_CACHE_DIR", str(tmp_path / "cache"))
  with pytest.raises(RuntimeError, match="could not build attention_cpu.cc: .*no AVX-512 here"):
    F.build(str(compiler))
  assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built left behind
