"""`attention.attend` as one fused CPU kernel per direction: the same maths, faster on CPUs.

Layer 1 of vit_jax, like `vit_jax.attention`, whose `attend` stays the readable definition
(and the path on GPUs and TPUs). On a CPU, XLA runs a head's two small products
(Q K^T and weights V, e.g. 50x16 by 16x50) and the softmax between them as separate
operations, each through memory; they took about a third of the `seed` training step.
`attention_cpu.cc` does one head's products and softmax in registers and L1 instead,
forward and backward, as an XLA FFI custom call (docs/performance.md has the figures).

The kernel is compiled on first use with the machine's C++ compiler (`g++ -O3
-march=native`, about 15 s) and cached under ~/.cache/vit_jax (or $VIT_JAX_CACHE_DIR),
keyed by its source, the compiler, jaxlib and the CPU. It needs AVX-512, float32, no mask,
a head dim of 16, 32 or 64 and at most 128 tokens; where it cannot be built (no compiler,
no AVX-512), `attend` warns once and uses `attention.attend`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
from jax import custom_derivatives

from vit_jax import attention as A

SOURCE = Path(__file__).with_name("attention_cpu.cc")
HEAD_DIMS = (16, 32, 64)
MAX_TOKENS = 128
_TARGETS = ("VitAttentionForward", "VitAttentionBackward", "VitAttentionBackwardWithWeights")


def supports(tokens: int, head_dim: int) -> bool:
  """Whether the kernel handles heads of `tokens` x `head_dim`."""
  return head_dim in HEAD_DIMS and 0 < tokens <= MAX_TOKENS


def cache_dir() -> Path:
  return Path(os.environ.get("VIT_JAX_CACHE_DIR", Path.home() / ".cache" / "vit_jax"))


def _cpu_flags() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return line
  except OSError:
    pass
  return platform.processor()


def build(compiler: str | None = None) -> Path:
  """Compiles the kernel (or finds it in the cache) and returns the shared library's path.

  Raises:
    RuntimeError: no compiler, or the compiler failed (e.g. no AVX-512); the message ends
      with the compiler's first error line.
  """
  compiler = compiler or os.environ.get("CXX", "g++")
  if shutil.which(compiler) is None:
    raise RuntimeError(f"no C++ compiler {compiler!r} on PATH")
  flags = ["-O3", "-march=native", "-std=c++20", "-shared", "-fPIC",
           f"-I{jax.ffi.include_dir()}"]
  key = hashlib.sha256()
  # The FFI headers' path names the jaxlib install; -march=native makes the CPU part of it.
  for part in (SOURCE.read_bytes(), " ".join([compiler, *flags]).encode(),
               jax.__version__.encode(), _cpu_flags().encode()):
    key.update(part)
  library = cache_dir() / f"attention_cpu-{key.hexdigest()[:16]}.so"
  if library.exists():
    return library
  library.parent.mkdir(parents=True, exist_ok=True)
  # Compile to a temporary name, then rename: concurrent first uses never load half a file.
  with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
    partial = Path(tmp) / library.name
    done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(partial)],
                          capture_output=True, text=True, check=False)
    if done.returncode:
      errors = [line for line in done.stderr.splitlines() if "error" in line]
      raise RuntimeError(f"{compiler} could not build {SOURCE.name}: "
                         f"{(errors or done.stderr.splitlines() or ['?'])[0]}")
    os.replace(partial, library)
  return library


@functools.cache
def load() -> str | None:
  """Builds and registers the kernel once per process; None, or why it is unavailable."""
  try:
    library = ctypes.cdll.LoadLibrary(str(build()))
  except (RuntimeError, OSError) as error:
    return str(error)
  for name in _TARGETS:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)),
                                platform="cpu")
  return None


def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`attention.attend(q, k, v)` (float32, no mask), by the fused kernel on CPUs.

  Args:
    q, k, v: (B, H, N, D/H) each.

  Returns:
    out: (B, H, N, D/H) and weights: (B, H, N, N), as `attention.attend`.
  """
  chex.assert_rank([q, k, v], 4)
  chex.assert_equal_shape([q, k, v])
  tokens, head_dim = q.shape[-2:]
  if jax.default_backend() != "cpu" or not supports(tokens, head_dim):
    return A.attend(q, k, v)
  if (why := load()) is not None:
    _warn_once(why)
    return A.attend(q, k, v)
  q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
  out, weights = _fused(q, k, v)
  chex.assert_equal_shape([out, q])
  chex.assert_shape(weights, q.shape[:-1] + (tokens,))
  return out, weights


@functools.cache
def _warn_once(why: str) -> None:
  warnings.warn(f"fused attention unavailable, using attention.attend: {why}", stacklevel=3)


def _forward_call(q, k, v):
  out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  weights = jax.ShapeDtypeStruct(q.shape[:-1] + (q.shape[-2],), jnp.float32)
  # The kernel treats every leading axis as heads, so vmap may just add one.
  return jax.ffi.ffi_call(_TARGETS[0], (out, weights), vmap_method="broadcast_all")(q, k, v)


@jax.custom_vjp
def _fused(q, k, v):
  return _forward_call(q, k, v)


def _fused_forward(q, k, v):
  q, k, v = q.value, k.value, v.value  # symbolic_zeros=True wraps the primals
  out, weights = _forward_call(q, k, v)
  return (out, weights), (q, k, v, weights)


def _fused_backward(residuals, cotangents):
  q, k, v, weights = residuals
  d_out, d_weights = cotangents
  grads = tuple(jax.ShapeDtypeStruct(q.shape, jnp.float32) for _ in range(3))
  if isinstance(d_out, custom_derivatives.SymbolicZero):
    d_out = jnp.zeros(q.shape, jnp.float32)
  # In training nothing reads the weights, so their cotangent is a symbolic zero: skip it.
  if isinstance(d_weights, custom_derivatives.SymbolicZero):
    return jax.ffi.ffi_call(_TARGETS[1], grads, vmap_method="broadcast_all")(
        q, k, v, weights, d_out)
  return jax.ffi.ffi_call(_TARGETS[2], grads, vmap_method="broadcast_all")(
      q, k, v, weights, d_out, d_weights)


_fused.defvjp(_fused_forward, _fused_backward, symbolic_zeros=True)
