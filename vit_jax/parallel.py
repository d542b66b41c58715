"""How arrays and steps are laid over devices: one device (jit) or all local ones (pmap).

A step function is written once, with an `axis_name` keyword that is None under
jit and names the device axis under pmap (for `lax.pmean` / `lax.psum`). The
runner compiles it, places the state and data, and splits global batches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

AXIS = "devices"


def choose_mode(parallel: str) -> str:
  """'auto' -> 'pmap' when JAX sees more than one local device, else 'jit'."""
  if parallel == "auto":
    return "pmap" if jax.local_device_count() > 1 else "jit"
  return parallel


class Runner:
  """Places state and data, splits global batches and compiles step functions."""

  def __init__(self, mode: str):
    if mode not in ("jit", "pmap"):
      raise ValueError(f"parallel={mode!r} is not one of 'auto', 'jit', 'pmap'")
    self.mode = mode
    self.num_devices = jax.local_device_count() if mode == "pmap" else 1

  def check_batch_size(self, key: str, batch_size: int) -> None:
    if batch_size % self.num_devices:
      raise ValueError(f"config.{key}={batch_size} is not divisible by the "
                       f"{self.num_devices} devices that {self.mode} runs on")

  def replicate(self, tree: Any) -> Any:
    """Puts `tree` on the device(s): one copy per device under pmap."""
    if self.mode == "jit":
      return jax.device_put(tree)
    devices = jax.local_devices()
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)),
                                          jax.sharding.PartitionSpec(AXIS))

    def put(x):
      x = np.asarray(x)[None]
      return jax.make_array_from_single_device_arrays(
          (len(devices), *x.shape[1:]), sharding, [jax.device_put(x, d) for d in devices])

    return jax.tree_util.tree_map(put, jax.device_get(tree))

  def unreplicate(self, tree: Any) -> Any:
    """The inverse of `replicate`: one host-side copy."""
    if self.mode == "jit":
      return jax.device_get(tree)
    return jax.device_get(jax.tree_util.tree_map(lambda x: x[0], tree))

  def split_batch(self, x: np.ndarray) -> np.ndarray:
    """(B, ...) -> (devices, B / devices, ...) under pmap; unchanged under jit."""
    if self.mode == "jit":
      return x
    return x.reshape(self.num_devices, x.shape[0] // self.num_devices, *x.shape[1:])

  def compile(self, fn: Callable[..., Any], in_axes: tuple[int | None, ...],
              donate_argnums: tuple[int, ...] = ()) -> Callable[..., Any]:
    """Compiles `fn(*args, axis_name=...)`.

    `in_axes` is pmap's: 0 for an argument split along its leading (device) axis,
    None for one that every device receives whole. jit ignores it.
    """
    if self.mode == "jit":
      return jax.jit(functools.partial(fn, axis_name=None), donate_argnums=donate_argnums)
    return jax.pmap(functools.partial(fn, axis_name=AXIS), axis_name=AXIS, in_axes=in_axes,
                    donate_argnums=donate_argnums)
