"""The machine's matmul peak, and images/s measured against it."""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp

from vit_jax import attention as A


def peak_matmul_size(platform: str) -> int:
  """Side of the square matmul that probes the peak: large enough to reach it there.

  2048 on a CPU; 8192 on a GPU or TPU, where a 2048 product takes microseconds and its
  timing would be the launch's, not the chip's.
  """
  return 2048 if platform == "cpu" else 8192


class MatmulPeak:
  """FLOP/s of a large square matmul on the default device: the machine's peak.

  Probed before every timed window, so that the probes spread over the whole run: on a
  shared machine the speed of both moves with the neighbours' load, and the median of many
  probes is steadier than one. The product is `attention.products` in `compute_dtype`, as
  the model computes its own.
  """

  def __init__(self, compute_dtype: str = "float32", size: int | None = None):
    if size is None:
      size = peak_matmul_size(jax.devices()[0].platform)
    self.size = size
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
    self.a, self.b = a.astype(compute_dtype), b.astype(compute_dtype)  # rounded once
    self.matmul = jax.jit(functools.partial(A.products, "ij,jk->ik", compute_dtype=compute_dtype))
    self.matmul(self.a, self.b).block_until_ready()
    self.flops = 2 * size**3
    self.measured: list[float] = []

  def probe(self, repeats: int = 3) -> None:
    """Appends to `measured` the FLOP/s of the median of `repeats` timed matmuls."""
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      self.matmul(self.a, self.b).block_until_ready()
      times.append(time.perf_counter() - start)
    self.measured.append(self.flops / statistics.median(times))


def images_per_second(run_window, windows: int, images: int, peak: MatmulPeak) -> float:
  """Images/s of `run_window`, which processes `images` images: the median over windows.

  Before each timed window the peak is probed, then the window runs once untimed (which
  also compiles it the first time), to warm the caches again that the probe evicted.
  """
  rates = []
  for _ in range(windows):
    peak.probe()
    run_window()
    start = time.perf_counter()
    run_window()
    rates.append(images / (time.perf_counter() - start))
  return statistics.median(rates)
