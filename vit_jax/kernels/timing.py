"""How much faster the fused kernel runs a model's attention than the einsum path, here; and
the order-balanced A/B timing that measures it (the benchmark's head-count ratio uses it too)."""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from vit_jax import attention as A
from vit_jax.kernels import fused_attention


def alternating_ratio(first: Callable[[], object], second: Callable[[], object],
                      rounds: int) -> float:
  """`first()`'s seconds over `second()`'s, the two timed in turn `rounds` times in this
  process, the order swapped every other round: the geometric mean of each order's median.

  Alternating, a neighbour's load on a shared machine weighs on both alike; swapping the
  order keeps whatever going first in a round does to a call from counting for one side only.
  What it cannot remove: the ratio differs between processes by several per cent (the 16-head
  step over the 4-head one, 0.78-0.84x over nine processes on 2026-12-04).
  """
  calls = (first, second)
  by_order: tuple[list[float], list[float]] = ([], [])
  for round_ in range(rounds):
    swapped = round_ % 2
    seconds = [0.0, 0.0]
    for i in ((1, 0) if swapped else (0, 1)):
      start = time.perf_counter()
      calls[i]()
      seconds[i] = time.perf_counter() - start
    by_order[swapped].append(seconds[0] / seconds[1])
  return math.sqrt(statistics.median(by_order[0]) * statistics.median(by_order[1] or by_order[0]))


def _gradient_step(attend, num_heads: int, fused_projection: bool = True):
  """One forward and backward of `attend` as the model runs it, jitted: from the fused
  projection's qkv (B, N, 3 D), Q, K and V chunked out and their heads split (slices that the
  einsum path pays for and the kernel, reading them in place, not), -> its gradient; or
  without `fused_projection`, from three projections' q, k, v (B, N, D) (which the kernel
  concatenates) -> their three gradients."""
  def loss(q, k, v):
    return attend(*(A.split_heads(t, num_heads) for t in (q, k, v)))[0].sum()
  if fused_projection:
    return jax.jit(jax.grad(lambda qkv: loss(*A.chunk_qkv(qkv))))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def speedup_over_einsum(shape: tuple[int, int, int, int], compute_dtype=None,
                        fused_projection: bool = True, rounds: int = 7,
                        calls: int = 10) -> float:
  """The einsum path's time over the kernel's for heads of `shape` (B, H, N, D/H).

  Forward and backward, `calls` calls at a time, the two alternating `rounds` times
  (`alternating_ratio`). Both paths' products in `compute_dtype`, as the run computes them
  (the kernel's in bfloat16 only where its build multiplies it); Q, K and V from one fused
  projection or, without `fused_projection`, from three (`_gradient_step`).
  """
  batch, heads, tokens, head_dim = shape
  qkv = jax.random.normal(jax.random.PRNGKey(0), (batch, tokens, 3 * heads * head_dim))
  inputs = (qkv,) if fused_projection else tuple(jnp.split(qkv, 3, axis=-1))
  steps = {"einsum": _gradient_step(functools.partial(A.attend, compute_dtype=compute_dtype),
                                    heads, fused_projection),
           "fused": _gradient_step(functools.partial(fused_attention.attend,
                                                     compute_dtype=compute_dtype), heads,
                                   fused_projection)}
  for step in steps.values():
    jax.block_until_ready(step(*inputs))  # compiles

  def run(step):
    return lambda: jax.block_until_ready([step(*inputs) for _ in range(calls)])

  return alternating_ratio(run(steps["einsum"]), run(steps["fused"]), rounds)
