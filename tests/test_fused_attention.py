"""The fused CPU attention kernel against numpy and against `attention.attend`."""

import os
import re
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from test_attention import rand, ref_attention

from vit_jax import attention as A
from vit_jax import kernels, models
from vit_jax.kernels import build as B
from vit_jax.kernels import fused_attention as F
from vit_jax.model_configs import get_model_config

# The kernel is written for AVX-512 or AVX2 with FMA and built with g++; where they are
# present it must build, so that a kernel that stopped compiling fails here instead of
# falling back unseen.
CPU = set(B.cpu_flags().split())
requires_kernel = pytest.mark.skipif(not ({"avx2", "fma"} <= CPU and shutil.which("g++")),
                                     reason="needs AVX2 with FMA, and g++")


@pytest.fixture(scope="module")
def kernel():
  why = F.load()
  assert why is None, why
  return F


def _uses_kernel(fn, *args, target="VitAttentionForward") -> bool:
  """Whether the compiled fn calls the kernel entry point `target`."""
  return re.search(f"@{target}\\(", jax.jit(fn).lower(*args).as_text()) is not None


SHAPES = [(2, 4, 50, 16),   # the seed's heads
          (3, 2, 17, 32),   # the fast config's
          (1, 1, 128, 64),  # the largest supported
          (2, 3, 5, 16),    # fewer tokens than a vector's 16 lanes
          (2, 2, 1, 16),    # one token
          (16, 4, 50, 16),  # 64 heads: shared out over XLA's threads in chunks of 8
          (17, 4, 50, 16),  # 68 heads: the last chunk a partial one
          (2, 16, 50, 4),   # 16 heads over a width of 64: rows narrower than a vector
          (2, 8, 50, 8),    # 8 heads over a width of 64
          (1, 3, 9, 4),     # heads of 4 over fewer tokens than a vector
          (1, 2, 100, 16),  # Q K^T in several passes of vectors, the last with padded keys
          (1, 2, 99, 4),    # the same with heads of 4, and padded query rows
          # Heads of 4, a vector's lanes of them to a token or a multiple (attention_cpu.cc's
          # LaneHeads: one head to each lane):
          (3, 32, 5, 4),    # two or four groups of heads an image, an odd number of keys
          (1, 16, 128, 4),  # the longest sequence
          (2, 16, 1, 4)]    # one token
# The limits Python states (`kernels.HEAD_DIMS`, `MAX_TOKENS`), which the C++ must honour.
LIMITS = [(1, 1, tokens, d) for d in kernels.HEAD_DIMS for tokens in (1, kernels.MAX_TOKENS)]


@requires_kernel
@pytest.mark.parametrize("shape,spread", [(s, 2.0) for s in SHAPES + LIMITS]
                         + [(SHAPES[0], 6.0), (SHAPES[7], 6.0)])
def test_values_match_numpy(kernel, shape, spread):
  # spread 2: logits over a few units; 6: over about +-100, so that most weights underflow
  # to 0 (and the float32 logits' own rounding, about 1e-5, sets the tolerance)
  q, k, v = (rand(*shape, seed=s) * spread for s in range(3))
  out, weights = jax.jit(kernel.attend)(q, k, v)
  ref_out, ref_weights = ref_attention(q.astype(np.float64), k.astype(np.float64),
                                       v.astype(np.float64))
  rtol = 1e-5 if spread == 2.0 else 1e-4
  np.testing.assert_allclose(weights, ref_weights, rtol=rtol, atol=1e-6)
  np.testing.assert_allclose(out, ref_out, rtol=rtol, atol=rtol * spread)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
  assert _uses_kernel(kernel.attend, q, k, v)


@requires_kernel
@pytest.mark.parametrize("shape", SHAPES)
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
      if reads in ("weights", "both"):  # the weights come by the einsum definition
        total += jnp.sum(weights * g_weights)
      return total
    return value

  fused = jax.jit(jax.grad(loss(kernel.attend), argnums=(0, 1, 2)))(q, k, v)
  expected = jax.grad(loss(A.attend), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(fused, expected, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert _uses_kernel(jax.grad(loss(kernel.attend)), q, k, v,
                      target="VitAttentionBackward") == (reads != "weights")


@requires_kernel
@pytest.mark.parametrize("heads,head_dim", [(2, 16), (2, 4), (16, 4)])  # (16, 4): in lanes
def test_a_nan_query_makes_its_own_output_row_nan_and_no_other(kernel, heads, head_dim):
  # As attention.attend does: no clamp inside the kernel may turn a NaN into a weight of 0,
  # which would hide it from the training loop's NaN check.
  q, k, v = (rand(1, heads, 50, head_dim, seed=s) for s in range(3))
  q[0, 1, 7, 0] = np.nan
  out = np.asarray(jax.jit(lambda q: kernel.attend(q, k, v)[0])(q))
  np.testing.assert_array_equal(np.isnan(out), np.isnan(A.attend(q, k, v)[0]))
  assert np.isnan(out[0, 1, 7]).all() and np.isnan(out).sum() == head_dim


@requires_kernel
def test_training_never_makes_the_n_by_n_weights(kernel):
  # What the backward pass needs of the forward is each query's log-sum-exp, (B, H, N): the
  # weights, (B, H, N, N), are computed again inside the kernel, never stored between them.
  q, k, v = (rand(2, 4, 50, 16, seed=s) for s in range(3))
  step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(kernel.attend(q, k, v)[0] ** 2),
                          argnums=(0, 1, 2)))
  compiled = step.lower(q, k, v).compile().as_text()
  assert "f32[2,4,50]" in compiled and "f32[2,4,50,50]" not in compiled
  assert _uses_kernel(lambda q: kernel.attend(q, k, v)[1], q) is False  # maps: the einsum


@requires_kernel
def test_second_derivatives_and_forward_mode_are_refused(kernel):
  q, k, v = (rand(2, 2, 17, 16, seed=s) for s in range(3))
  first = jax.grad(lambda q: jnp.sum(kernel.attend(q, k, v)[0] ** 2))
  with pytest.raises(NotImplementedError, match="first derivatives only"):
    jax.grad(lambda q: jnp.sum(first(q)))(q)
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(lambda q: kernel.attend(q, k, v), (q,), (q,))


@requires_kernel
def test_vmap_and_pmap_give_the_same_values(kernel):
  q, k, v = (rand(4, 2, 3, 17, 16, seed=s) for s in range(3))
  batched = jax.vmap(kernel.attend)(q, k, v)
  mapped = jax.pmap(kernel.attend)(q, k, v)  # four of the conftest's eight CPU devices
  assert _uses_kernel(jax.vmap(kernel.attend), q, k, v)
  for i in range(4):
    one = kernel.attend(q[i], k[i], v[i])
    for got in (batched, mapped):
      np.testing.assert_allclose(got[0][i], one[0], rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(got[1][i], one[1], rtol=1e-6, atol=1e-6)


@requires_kernel
def test_vmapped_gradients_equal_the_definitions(kernel):
  # vmap adds a leading axis to the kernel's arrays, its saved lse included.
  q, k, v = (rand(3, 2, 4, 17, 8, seed=s) for s in range(3))

  def gradients(attend):
    return jax.vmap(jax.grad(lambda q, k, v: (attend(q, k, v)[0] ** 2).sum(), (0, 1, 2)))

  assert _uses_kernel(gradients(kernel.attend), q, k, v)
  fused, definition = gradients(kernel.attend)(q, k, v), gradients(A.attend)(q, k, v)
  for got, want in zip(fused, definition, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


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


@requires_kernel
def test_the_kernel_uses_the_widest_vectors_it_was_built_for(kernel):
  march = os.environ.get(B.MARCH_VARIABLE)
  if march not in (None, "x86-64-v3"):
    pytest.skip(f"{B.MARCH_VARIABLE}={march}: width unknown")
  assert kernel.lanes() == (16 if march is None and "avx512f" in CPU else 8)


# The numerics, vmap/pmap and model tests above, in a process that builds the AVX2 kernel.
AVX2_TESTS = ("values_match or gradients_match or vmap_and_pmap or model_with or widest_vectors"
              " or nan_query or bfloat16_products_only")  # NaN: its own exp; bfloat16: none


@requires_kernel
@pytest.mark.slow
@pytest.mark.skipif("avx512f" not in CPU, reason="without AVX-512 the tests above are AVX2's")
@pytest.mark.skipif(B.MARCH_VARIABLE in os.environ, reason="already a chosen build")
def test_the_avx2_build_passes_the_same_tests(tmp_path):
  # Machines without AVX-512 (e.g. Zen 3) build 8-float vectors: a path of its own.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env[B.MARCH_VARIABLE] = "x86-64-v3"  # AVX2 and FMA, no AVX-512; runs on this CPU
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
       __file__.replace(".py", "_bf16.py"), "-k", AVX2_TESTS], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:]
  expected = (len(SHAPES + LIMITS) + 2) + 3 * len(SHAPES) + 4 + 3 + 1  # ..., NaNs, bfloat16
  assert re.search(r"\b(\d+) passed", result.stdout).group(1) == str(expected), (
      result.stdout[-500:])


@requires_kernel
def test_the_kernel_is_timed_against_einsum_on_the_model_s_heads(kernel, monkeypatch):
  from vit_jax.kernels import timing

  # A clock only the two paths' gradient calls advance (einsum 3 s a call, the kernel 1 s):
  # the ratio then checks which path is which and how often each ran, not this machine's load.
  clock, ran = {"now": 0.0}, {"einsum": 0, "fused": 0}
  monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
  real_gradient_step = timing._gradient_step

  def counted_gradient_step(attend, num_heads, fused_projection):
    step = real_gradient_step(attend, num_heads, fused_projection)
    path = "fused" if getattr(attend, "func", attend) is F.attend else "einsum"

    def call(*inputs):  # qkv (B, N, 3 D), or q, k, v (B, N, D): the heads split as the model does
      grads = jax.tree.leaves(step(*inputs))  # compiled and run for real: forward and backward
      assert [g.shape for g in grads] == [x.shape for x in inputs] and num_heads == 4
      assert all(bool(jnp.isfinite(g).all()) for g in grads)
      ran[path] += 1
      clock["now"] += 3.0 if path == "einsum" else 1.0
      return grads
    return call

  monkeypatch.setattr(timing, "_gradient_step", counted_gradient_step)
  for compute_dtype, fused in (("float32", True), ("bfloat16", True), ("float32", False)):
    ran.update(einsum=0, fused=0)
    assert timing.speedup_over_einsum(SHAPES[0], compute_dtype, fused, rounds=3, calls=2) == 3.0
    assert ran == {"einsum": 1 + 3 * 2, "fused": 1 + 3 * 2}  # a compiling call, then 3 rounds


@requires_kernel
def test_a_mixed_precision_model_with_the_kernel_is_close_to_the_einsum_model(kernel):
  config = get_model_config("testing", hidden_size=32, num_heads=8, compute_dtype="bfloat16")
  fused_config = get_model_config("testing", hidden_size=32, num_heads=8,
                                  compute_dtype="bfloat16", attention_kernel="fused_cpu")
  images = jax.random.uniform(jax.random.PRNGKey(1), (4, 28, 28, 1))
  params = models.ViT(config).init(jax.random.PRNGKey(0), images)
  # A random head: the zero-initialised one would give zero logits to both paths.
  params["params"]["head"]["kernel"] = jnp.asarray(rand(32, 10, seed=7))

  def logits_and_maps(model_config):
    logits, state = models.ViT(model_config).apply(params, images, mutable=["intermediates"])
    return np.asarray(logits), np.asarray(models.attention_maps(state["intermediates"]))

  logits, maps = logits_and_maps(config)
  fused_logits, fused_maps = logits_and_maps(fused_config)
  assert np.abs(logits).max() > 0.1
  # Heads of 4: the kernel rounds its products' operands (AVX-512 BF16) or none; close.
  np.testing.assert_allclose(fused_logits, logits, rtol=2e-2, atol=3e-2)
  np.testing.assert_allclose(fused_maps, maps, atol=2e-2)
  assert not np.array_equal(fused_maps, maps)
  assert _uses_kernel(lambda p: models.ViT(fused_config).apply(p, images), params)
