"""`attention.attend` as one fused CPU kernel per direction: the same maths, faster on CPUs.

`vit_jax.attention.attend` stays the readable definition (and the path on GPUs and TPUs).
On a CPU, XLA runs a head's two small products (Q K^T and weights V, e.g. 50x16 by 16x50)
and the softmax between them as separate operations, each through memory;
`attention_cpu.cc` does one head's products and softmax in registers and L1 instead,
forward and backward, as an XLA FFI custom call (docs/performance.md, "Attention as one
kernel", has the figures). `build.py` compiles it on first use.

It computes in float32; under a bfloat16 compute_dtype, where its build multiplies bfloat16
(AVX-512 BF16; `bfloat16_products`), its products take operands rounded to bfloat16 as the
einsum path's do, up to where the scale is applied (attention_cpu.cc's header says which),
and it rounds its results to bfloat16 itself, where XLA would have next. It takes no mask,
and needs a head dim in `kernels.HEAD_DIMS` and at most `kernels.MAX_TOKENS` tokens. Where
it cannot be built (no compiler, no AVX2), `attend` warns once and uses `attention.attend`
(in float32), as it does when the computation is compiled for a GPU or TPU. It
differentiates once, in reverse mode: `jax.grad` of `jax.grad` and `jax.jvp` raise errors
that say so.
"""

from __future__ import annotations

import ctypes
import functools
import warnings

import chex
import jax
import jax.numpy as jnp

from vit_jax import attention as A
from vit_jax.kernels import supports
from vit_jax.kernels.build import build

_TARGETS = ("VitAttentionForward", "VitAttentionBackward")


@functools.cache
def _library() -> ctypes.CDLL | str:
  """The built kernel, loaded once per process, with its targets registered; or why not."""
  try:
    library = ctypes.cdll.LoadLibrary(str(build()))
  except (RuntimeError, OSError) as error:
    return str(error)
  for name in _TARGETS:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)),
                                platform="cpu")
  return library


def load() -> str | None:
  """Builds and registers the kernel once per process; None, or why it is unavailable."""
  library = _library()
  return library if isinstance(library, str) else None


def lanes() -> int | None:
  """Floats per vector in the loaded kernel: 16 (AVX-512) or 8 (AVX2); None if none loaded."""
  library = _library()
  return None if isinstance(library, str) else library.VitAttentionLanes()


def bfloat16_products() -> bool:
  """Whether the loaded kernel rounds its products' operands to bfloat16 when the model
  computes in bfloat16 (AVX-512 BF16 builds; attention_cpu.cc's header lists which)."""
  library = _library()
  return not isinstance(library, str) and bool(library.VitAttentionBf16())


def available() -> bool:
  """Whether `attend` takes the kernel here (JAX's default backend is a CPU, and it built)."""
  return jax.default_backend() == "cpu" and load() is None


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: None = None,
           compute_dtype=None, round_results: bool = True) -> tuple[jax.Array, jax.Array]:
  """`attention.attend(q, k, v)` in float32, no mask, by the fused kernel on CPUs.

  Args:
    q, k, v: (B, H, N, D/H) each.
    mask: as `attention.attend` takes it, but only None: the kernel has no mask.
    compute_dtype: None or float32: every product in float32. bfloat16, where the build
      multiplies it (`bfloat16_products`): the products from operands rounded to bfloat16,
      summed in float32 (some products stay float32 at some head sizes, where that measured
      faster: attention_cpu.cc's header says which); the softmax in float32; out and the
      gradients of q, k, v rounded to bfloat16 (returned as float32) with `round_results`,
      as the products that read them would round them (see `_fused`).
    round_results: False where a gradient of q, k or v goes anywhere but straight into a
      product (q, k or v the tokens themselves, or a projection with a bias): then they stay
      float32, as on the einsum path.

  Returns:
    out: (B, H, N, D/H) and weights: (B, H, N, N), as `attention.attend`.
  """
  if mask is not None:
    raise ValueError("attention_kernel='fused_cpu' takes no mask: use 'einsum'")
  chex.assert_rank([q, k, v], 4)
  chex.assert_equal_shape([q, k, v])
  tokens, head_dim = q.shape[-2:]
  # Only where a CPU is the default does the kernel get built at all; `platform_dependent`
  # then still lowers the einsum path for a computation placed on another platform.
  if jax.default_backend() != "cpu" or not supports(tokens, head_dim):
    return A.attend(q, k, v)
  if (why := load()) is not None:
    _warn_once(why)
    return A.attend(q, k, v)
  q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
  low = (compute_dtype is not None and jnp.dtype(compute_dtype) == jnp.bfloat16
         and bfloat16_products())
  out = jax.lax.platform_dependent(q, k, v, cpu=functools.partial(_fused_heads_apart, low,
                                                                   low and round_results),
                                   default=lambda q, k, v: A.attend(q, k, v)[0])
  # The weights for whatever reads them (attention maps), by the definition; where nothing
  # does (training, evaluation), XLA drops them and the kernel's (n, n) never exist.
  weights = A.attention_weights(q, k)
  chex.assert_equal_shape([out, q])
  chex.assert_shape(weights, q.shape[:-1] + (tokens,))
  return out, weights


@functools.cache
def _warn_once(why: str) -> None:
  warnings.warn(f"fused attention unavailable, using attention.attend: {why}", stacklevel=3)


def _fused_heads_apart(bf16: bool, rounded: bool, q, k, v):
  """`_fused` for (B, H, N, D/H) heads. The kernel takes the tokens before the heads and Q, K
  and V side by side, (B, N, 3, H, D/H), as the fused projection `to_qkv` lays them out:
  XLA cancels these transposes against `split_heads`' and `merge_heads`', and this
  concatenation (and, in the backward pass, its slices) against `chunk_qkv`'s split, so
  neither the heads nor Q, K and V are ever moved in memory (with separate W_Q, W_K, W_V the
  concatenation is a copy)."""
  tokens_first = [jnp.swapaxes(t, -3, -2) for t in (q, k, v)]  # (B, N, H, D/H)
  heads, head_dim = q.shape[-3], q.shape[-1]
  # Concatenated as (B, N, 3 D), the form in which XLA's simplifier recognises chunk_qkv's
  # three slices and folds them back into the projection's result.
  qkv = jnp.concatenate([t.reshape(*t.shape[:-2], heads * head_dim) for t in tokens_first], -1)
  qkv = qkv.reshape(*qkv.shape[:-1], 3, heads, head_dim)
  return jnp.swapaxes(_fused(bf16, rounded, qkv), -3, -2)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _kernel_call(target: str, bf16: bool, rounded: bool, qkv, *arrays):
  """The FFI call `target`: qkv -> (out, lse) or (qkv, lse, d_out) -> (dqkv,); qkv and dqkv
  (..., N, 3, H, D/H), out and d_out (..., N, H, D/H), lse (..., H, N), each query's
  log-sum-exp of its scaled scores; `bf16`: products from bfloat16 operands, where the build
  has them (`bfloat16_products`); `rounded`: out or dqkv in bfloat16 (rounded to nearest,
  ties to even, as XLA's conversion), else float32."""
  tokens, _, heads, head_dim = qkv.shape[-4:]
  out = qkv.shape[:-4] + (tokens, heads, head_dim)
  lse = qkv.shape[:-4] + (heads, tokens)
  result = jnp.bfloat16 if rounded else jnp.float32
  results = (((out, result), (lse, jnp.float32)) if target == _TARGETS[0]
             else ((qkv.shape, result),))
  # Every axis before (N, 3, H, D/H) is a batch axis to the kernel, so vmap may just add one.
  return jax.ffi.ffi_call(target, tuple(jax.ShapeDtypeStruct(*r) for r in results),
                          vmap_method="broadcast_all")(qkv, *arrays, bf16=bf16)


@_kernel_call.defjvp
def _kernel_call_jvp(target, bf16, rounded, primals, tangents):
  # Reached only by differentiating the custom VJP's own rules: a second derivative.
  del target, bf16, rounded, primals, tangents
  raise NotImplementedError(
      "attention_kernel='fused_cpu' has first derivatives only: for jax.grad of jax.grad, "
      "use attention_kernel='einsum'")


# Under bfloat16 products, the kernel rounds its results, out and dqkv, to bfloat16 itself:
# they go on to products that round them to it anyway (to_out's and, backward, the Q, K and V
# projections'), where XLA's own conversions, passes through memory of their own, took 2.4 %
# of the training step's device time (`rounded`; not where a gradient goes elsewhere:
# `attend`'s round_results).
# Both come back as float32, what `attention.attend` returns and qkv's dtype: XLA cancels
# that conversion against the products' own.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(bf16, rounded, qkv):
  return _fused_forward(bf16, rounded, qkv)[0]


def _fused_forward(bf16, rounded, qkv):
  out, lse = _kernel_call(_TARGETS[0], bf16, rounded, qkv)
  return out.astype(jnp.float32), (qkv, lse)  # the weights are computed again, not saved


def _fused_backward(bf16, rounded, residuals, d_out):
  qkv, lse = residuals
  (dqkv,) = _kernel_call(_TARGETS[1], bf16, rounded, qkv, lse, d_out)
  return (dqkv.astype(jnp.float32),)


_fused.defvjp(_fused_forward, _fused_backward)
