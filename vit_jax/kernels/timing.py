"""How much faster the fused kernel runs a model's attention than the einsum path, here."""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp

from vit_jax import attention as A
from vit_jax.kernels import fused_attention


def _gradient_step(attend):
  """One forward and backward of `attend`, as training runs it: jitted (q, k, v) -> grads."""
  return jax.jit(jax.grad(lambda q, k, v: attend(q, k, v)[0].sum(), argnums=(0, 1, 2)))


def speedup_over_einsum(shape: tuple[int, int, int, int], compute_dtype=None, rounds: int = 7,
                        calls: int = 10) -> float:
  """The einsum path's time over the kernel's for heads of `shape` (B, H, N, D/H).

  Forward and backward, alternating between the two `rounds` times (`calls` calls each), so
  that a neighbour's load on a shared machine weighs on both alike; the median ratio. The
  einsum path's products in `compute_dtype`, as the run computes them (the kernel's stay
  float32).
  """
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k, v = (jax.random.normal(key, shape, jnp.float32) for key in keys)
  steps = {"einsum": _gradient_step(functools.partial(A.attend, compute_dtype=compute_dtype)),
           "fused": _gradient_step(fused_attention.attend)}
  for step in steps.values():
    jax.block_until_ready(step(q, k, v))  # compiles

  def seconds(step) -> float:
    start = time.perf_counter()
    for _ in range(calls):
      out = step(q, k, v)
    jax.block_until_ready(out)
    return time.perf_counter() - start

  ratios = [seconds(steps["einsum"]) / seconds(steps["fused"]) for _ in range(rounds)]
  return statistics.median(ratios)
