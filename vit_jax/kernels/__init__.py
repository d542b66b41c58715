"""Plug-in kernels: faster implementations of the maths in `vit_jax.attention`.

The models see only `attend_function(name)`; the kernels' build machinery (a C++ compiler,
a cache, CPU detection, FFI registration) is imported when a kernel is first asked for, not
when a config is read. Importing this package imports nothing but the standard library.

    'einsum'     `attention.attend`: the pure functions, the definition, on any platform.
    'fused_cpu'  `kernels.fused_attention.attend`: each head's two products and softmax as
                 one C++ kernel per direction on CPUs; float32 (bfloat16 products under a
                 bfloat16 model, with AVX-512 BF16), no mask, the shapes below.
"""

from __future__ import annotations

from collections.abc import Callable

KERNELS = ("einsum", "fused_cpu")
HEAD_DIMS = (4, 8, 16, 32, 64)  # the fused kernel's head dims
MAX_TOKENS = 128  # and its longest sequence


def supports(tokens: int, head_dim: int) -> bool:
  """Whether the fused kernel handles heads of `tokens` x `head_dim`."""
  return head_dim in HEAD_DIMS and 0 < tokens <= MAX_TOKENS


def attend_function(name: str, round_results: bool = True) -> Callable:
  """The implementation of `attention.attend` named `name`: (q, k, v, mask, compute_dtype)
  -> (out, weights), each q, k, v (B, H, N, D/H). `round_results`: whether the fused kernel,
  under bfloat16 products, may round its output and the gradients of q, k, v to bfloat16
  (`fused_attention.attend`): only where each goes straight into a product."""
  if name == "einsum":
    from vit_jax import attention

    return attention.attend
  if name == "fused_cpu":
    import functools

    from vit_jax.kernels import fused_attention

    return functools.partial(fused_attention.attend, round_results=round_results)
  if name == "auto":
    raise ValueError("attention_kernel='auto' is chosen when a run starts (vit_jax.auto); "
                     "a model takes 'einsum' or 'fused_cpu'")
  raise ValueError(f"attention_kernel={name!r} is not one of "
                   f"{', '.join(map(repr, KERNELS))}")
