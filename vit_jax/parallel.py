"""How arrays and steps are laid over devices, in one process or several.

Three modes, one step function:
- 'jit': one device.
- 'pmap': every device runs the step on its slice of the global batch; the
  step's `axis_name` keyword names the device axis for `lax.pmean` / `lax.psum`.
- 'shard': `jax.jit` over a device `Mesh`, the batch sharded along its 'data'
  axis and the parameters replicated; XLA inserts the cross-device reductions, so
  the step is the single-device one (`axis_name=None`).

With several processes (`jax.distributed.initialize`), pmap and shard span every
process's devices. Every process computes the same global batch of indices (the
order derives from the seed) and feeds only its own share of it.
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


def gathered(values: list[int]) -> np.ndarray:
  """Every process's `values`, (processes, len(values)) in process order. With several
  processes it is a collective: each must call it at the same point of the run."""
  if jax.process_count() == 1:
    return np.asarray([values])
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int64)))


def choose_mode(parallel: str) -> str:
  """'auto' -> 'pmap' when JAX sees more than one device, else 'jit'."""
  if parallel == "auto":
    return "pmap" if jax.device_count() > 1 else "jit"
  return parallel


class Runner:
  """Places state and data, splits global batches and compiles step functions."""

  def __init__(self, mode: str):
    if mode not in MODES:
      raise ValueError(f"parallel={mode!r} is not one of 'auto', {', '.join(map(repr, MODES))}")
    if mode == "jit" and jax.process_count() > 1:
      raise ValueError(f"parallel='jit' runs on one device, but {jax.process_count()} "
                       "processes were started: use 'pmap' or 'shard'")
    self.mode = mode
    self.num_devices = 1 if mode == "jit" else jax.device_count()
    self.num_processes, self.process_index = jax.process_count(), jax.process_index()
    if mode != "jit":
      # Process-major device order: process p's devices hold rows of p's share.
      self.mesh = Mesh(np.array(jax.devices()), (AXIS,))
      self.split = NamedSharding(self.mesh, PartitionSpec(AXIS))
      self.whole = NamedSharding(self.mesh, PartitionSpec())

  @property
  def is_main_process(self) -> bool:
    """Only process 0 writes logs, metrics and progress."""
    return self.process_index == 0

  def check_batch_size(self, key: str, batch_size: int) -> None:
    if batch_size % self.num_devices:
      raise ValueError(f"config.{key}={batch_size} is not divisible by the "
                       f"{self.num_devices} devices that {self.mode} runs on")

  def num_microbatches(self, batch_size: int, microbatch_size: int | None) -> int:
    """Micro-batches per step when each device takes `microbatch_size` examples at a time.

    A device's share of the batch that is no larger than `microbatch_size` is one.
    """
    per_device = batch_size // self.num_devices
    if microbatch_size is None or per_device <= microbatch_size:
      return 1
    if per_device % microbatch_size:
      over = "" if self.num_devices == 1 else f" over {self.num_devices} devices"
      raise ValueError(f"config.microbatch_size={microbatch_size} does not divide the "
                       f"{per_device} examples per device of config.batch_size={batch_size}"
                       f"{over}")
    return per_device // microbatch_size

  def replicate(self, tree: Any) -> Any:
    """Puts `tree` on every device (with a leading device axis under pmap)."""
    tree = jax.device_get(tree)
    if self.mode == "jit":
      return jax.device_put(tree)
    if self.mode == "shard":
      return jax.tree_util.tree_map(
          lambda x: jax.make_array_from_process_local_data(self.whole, np.asarray(x)), tree)
    devices = jax.local_devices()
    local_split = NamedSharding(Mesh(np.array(devices), (AXIS,)), PartitionSpec(AXIS))

    def put(x):
      x = np.asarray(x)[None]
      return jax.make_array_from_single_device_arrays(
          (len(devices), *x.shape[1:]), local_split, [jax.device_put(x, d) for d in devices])

    return jax.tree_util.tree_map(put, tree)

  def unreplicate(self, tree: Any) -> Any:
    """The inverse of `replicate`: one host-side copy (this process's first device's)."""
    def get(x):
      local = np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)
      return local[0] if self.mode == "pmap" else local

    return jax.tree_util.tree_map(get, tree)

  def split_batch(self, x: np.ndarray) -> Any:
    """A global batch (B, ...), the same in every process, laid over the devices.

    jit: unchanged. pmap: this process's share, reshaped to (local devices,
    rows per device, ...). shard: one global array, its rows split over the mesh.
    """
    if self.mode == "jit":
      return x
    share = x.shape[0] // self.num_processes
    local = x[self.process_index * share:(self.process_index + 1) * share]
    if self.mode == "shard":
      return jax.make_array_from_process_local_data(self.split, local, x.shape)
    return local.reshape(jax.local_device_count(), -1, *x.shape[1:])

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
