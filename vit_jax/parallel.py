"""How arrays and steps are laid over devices.

Three modes, one step function:
- 'jit': one device.
- 'pmap': every local device runs the step on its slice of the global batch;
  the step's `axis_name` keyword names the device axis for `lax.pmean`/`psum`.
- 'shard': `jax.jit` over a device `Mesh`, the batch sharded along its 'data'
  axis and the parameters replicated; XLA inserts the cross-device reductions, so
  the step is the single-device one (`axis_name=None`).
The runner compiles the step, places the state and data, and splits global batches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"
MODES = ("jit", "pmap", "shard")


def choose_mode(parallel: str) -> str:
  """'auto' -> 'pmap' when JAX sees more than one local device, else 'jit'."""
  if parallel == "auto":
    return "pmap" if jax.local_device_count() > 1 else "jit"
  return parallel


class Runner:
  """Places state and data, splits global batches and compiles step functions."""

  def __init__(self, mode: str):
    if mode not in MODES:
      raise ValueError(f"parallel={mode!r} is not one of 'auto', {', '.join(map(repr, MODES))}")
    self.mode = mode
    self.num_devices = 1 if mode == "jit" else jax.local_device_count()
    if mode != "jit":
      self.mesh = Mesh(np.array(jax.local_devices()), (AXIS,))
      self.split = NamedSharding(self.mesh, PartitionSpec(AXIS))
      self.whole = NamedSharding(self.mesh, PartitionSpec())

  def check_batch_size(self, key: str, batch_size: int) -> None:
    if batch_size % self.num_devices:
      raise ValueError(f"config.{key}={batch_size} is not divisible by the "
                       f"{self.num_devices} devices that {self.mode} runs on")

  def replicate(self, tree: Any) -> Any:
    """Puts `tree` on the device(s): a copy on each (with a leading device axis under pmap)."""
    if self.mode == "jit":
      return jax.device_put(tree)
    if self.mode == "shard":
      return jax.device_put(tree, self.whole)
    devices = self.mesh.devices.tolist()

    def put(x):
      x = np.asarray(x)[None]
      return jax.make_array_from_single_device_arrays(
          (len(devices), *x.shape[1:]), self.split, [jax.device_put(x, d) for d in devices])

    return jax.tree_util.tree_map(put, jax.device_get(tree))

  def unreplicate(self, tree: Any) -> Any:
    """The inverse of `replicate`: one host-side copy."""
    if self.mode == "pmap":
      tree = jax.tree_util.tree_map(lambda x: x[0], tree)
    return jax.device_get(tree)

  def split_batch(self, x: np.ndarray) -> Any:
    """A global batch (B, ...) laid over the devices.

    jit: unchanged. pmap: reshaped to (devices, B / devices, ...). shard: one
    global array whose rows are split over the mesh's 'data' axis.
    """
    if self.mode == "jit":
      return x
    if self.mode == "shard":
      return jax.device_put(x, self.split)
    return x.reshape(self.num_devices, x.shape[0] // self.num_devices, *x.shape[1:])

  def compile(self, fn: Callable[..., Any], in_axes: tuple[int | None, ...],
              donate_argnums: tuple[int, ...] = ()) -> Callable[..., Any]:
    """Compiles `fn(*args, axis_name=...)`.

    `in_axes` is pmap's: 0 for an argument split along its leading (device) axis,
    None for one that every device receives whole. jit and shard ignore it: their
    arguments carry their own placement.
    """
    if self.mode == "pmap":
      return jax.pmap(functools.partial(fn, axis_name=AXIS), axis_name=AXIS, in_axes=in_axes,
                      donate_argnums=donate_argnums)
    return jax.jit(functools.partial(fn, axis_name=None), donate_argnums=donate_argnums)
