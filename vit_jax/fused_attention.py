"""`attention.attend` as one fused CPU kernel per direction: the same maths, faster on CPUs.

Layer 1 of vit_jax, like `vit_jax.attention`, whose `attend` stays the readable definition
(and the path on GPUs and TPUs). On a CPU, XLA runs a head's two small products
(Q K^T and weights V, e.g. 50x16 by 16x50) and the softmax between them as separate
operations, each through memory; they took about a third of the `seed` training step.
`attention_cpu.cc` does one head's products and softmax in registers and L1 instead,
forward and backward, as an XLA FFI custom call (docs/performance.md, "Attention as one
kernel", has the figures).

The kernel is compiled on first use with the machine's C++ compiler (`g++ -O3
-march=native`, 15-60 s) and cached under ~/.cache/vit_jax (or $VIT_JAX_CACHE_DIR),
keyed by its source, the compiler and its version, JAX, jaxlib and the CPU's flags; a
failed build is cached too, so it is not retried by every process, and builds unused for
30 days are deleted when a new one is made. It is built for
AVX-512 (16-float vectors) or, on CPUs without it, AVX2 with FMA (8-float vectors);
$VIT_JAX_KERNEL_MARCH replaces `native` (the tests build `x86-64-v3`, AVX2, on AVX-512
machines too). It needs float32, no mask, a head dim of 16, 32 or 64 and at most 128
tokens. Where it cannot be built (no compiler, no AVX2), `attend` warns once and uses
`attention.attend`, as it does when the computation is compiled for a GPU or TPU. It
differentiates once, in reverse mode: `jax.grad` of `jax.grad` and `jax.jvp` raise errors
that say so.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
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
MARCH_VARIABLE = "VIT_JAX_KERNEL_MARCH"
UNUSED_DAYS = 30  # a cached build unused this long is deleted by the next new build


def supports(tokens: int, head_dim: int) -> bool:
  """Whether the kernel handles heads of `tokens` x `head_dim`."""
  return head_dim in HEAD_DIMS and 0 < tokens <= MAX_TOKENS


def cache_dir() -> Path:
  return Path(os.environ.get("VIT_JAX_CACHE_DIR", Path.home() / ".cache" / "vit_jax"))


def cpu_flags() -> str:
  """The CPU's feature flags as /proc/cpuinfo lists them ('' where there is none)."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return line.split(":", 1)[1]
  except OSError:
    pass
  return ""


def build(compiler: str | None = None) -> Path:
  """Compiles the kernel (or finds it in the cache) and returns the shared library's path.

  Args:
    compiler: the C++ compiler; default $CXX, else g++.

  Raises:
    RuntimeError: no AVX2 with FMA, no compiler, a $VIT_JAX_KERNEL_MARCH whose code this
      CPU cannot run, or the compiler failed, now or in an earlier process (the message
      ends with the compiler's first error line).
  """
  cpu = cpu_flags()
  features = set(cpu.split())
  if not {"avx2", "fma"} <= features:  # the least the kernel is written for
    raise RuntimeError(f"the CPU has no AVX2 with FMA ({platform.machine()})")
  compiler = compiler or os.environ.get("CXX", "g++")
  if shutil.which(compiler) is None:
    raise RuntimeError(f"no C++ compiler {compiler!r} on PATH")
  march = os.environ.get(MARCH_VARIABLE) or "native"
  if march != "native" and "avx512f" not in features:
    _refuse_avx512(compiler, march)
  flags = ["-O3", f"-march={march}", "-std=c++20", "-shared", "-fPIC",
           f"-I{jax.ffi.include_dir()}"]
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                           check=False).stdout
  key = hashlib.sha256()
  for part in (SOURCE.read_text(), compiler, version, *flags, jax.__version__,
               importlib.metadata.version("jaxlib"), cpu):
    key.update(part.encode() + b"\0")
  library = cache_dir() / f"attention_cpu-{key.hexdigest()[:16]}.so"
  failure = library.with_suffix(".failed")
  if library.exists():
    _mark_used(library)
    return library
  if failure.exists():
    _mark_used(failure)
    raise RuntimeError(failure.read_text())
  library.parent.mkdir(parents=True, exist_ok=True)
  print(f"vit_jax: compiling the fused attention kernel (-march={march}), once per machine: "
        f"15-60 s, into {library.parent}", file=sys.stderr, flush=True)
  _compile(compiler, flags, library, failure)
  _delete_unused(library.parent)
  return library


def _refuse_avx512(compiler: str, march: str) -> None:
  """Raises if -march=`march` means AVX-512 code: on a CPU without it, such a build would
  load, then kill the process at its first call (illegal instruction)."""
  macros = subprocess.run([compiler, f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull],
                          capture_output=True, text=True, check=False).stdout
  if "__AVX512F__" in macros.split():
    raise RuntimeError(f"{MARCH_VARIABLE}={march} builds AVX-512 code, which this CPU "
                       "cannot run")


def _compile(compiler: str, flags: list[str], library: Path, failure: Path) -> None:
  """Builds `library`, or writes why not to `failure` and raises it."""
  # Compile to a temporary name, then rename: concurrent first uses never load half a file.
  with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
    partial = Path(tmp) / library.name
    done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(partial)],
                          capture_output=True, text=True, check=False)
    if done.returncode:
      errors = [line for line in done.stderr.splitlines() if "error" in line]
      why = (f"{compiler} could not build {SOURCE.name}: "
             f"{(errors or done.stderr.splitlines() or ['no message'])[0]}")
      failure.write_text(why)
      raise RuntimeError(why)
    os.replace(partial, library)


def _mark_used(path: Path) -> None:
  with contextlib.suppress(OSError):  # a read-only cache still serves
    os.utime(path)


def _delete_unused(folder: Path) -> None:
  """Deletes builds and failures unused for UNUSED_DAYS: each change of the source, the
  compiler, JAX or the flags leaves one behind."""
  cutoff = time.time() - UNUSED_DAYS * 24 * 3600
  for path in folder.glob("attention_cpu-*"):
    with contextlib.suppress(OSError):  # gone already, or not ours to delete
      if path.is_file() and path.stat().st_mtime < cutoff:
        path.unlink()


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


def available() -> bool:
  """Whether `attend` takes the kernel here (JAX's default backend is a CPU, and it built)."""
  return jax.default_backend() == "cpu" and load() is None


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
  # Only where a CPU is the default does the kernel get built at all; `platform_dependent`
  # then still lowers the einsum path for a computation placed on another platform.
  if jax.default_backend() != "cpu" or not supports(tokens, head_dim):
    return A.attend(q, k, v)
  if (why := load()) is not None:
    _warn_once(why)
    return A.attend(q, k, v)
  q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
  out, weights = jax.lax.platform_dependent(q, k, v, cpu=_fused, default=A.attend)
  chex.assert_equal_shape([out, q])
  chex.assert_shape(weights, q.shape[:-1] + (tokens,))
  return out, weights


@functools.cache
def _warn_once(why: str) -> None:
  warnings.warn(f"fused attention unavailable, using attention.attend: {why}", stacklevel=3)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _kernel_call(target: str, q, *arrays):
  """The FFI call `target`: (q, k, v) -> (out, weights) or (q, ...) -> (dq, dk, dv)."""
  weights = q.shape[:-1] + (q.shape[-2],)
  results = (q.shape, weights) if target == _TARGETS[0] else (q.shape,) * 3
  # The kernel treats every leading axis as heads, so vmap may just add one.
  return jax.ffi.ffi_call(target, tuple(jax.ShapeDtypeStruct(r, jnp.float32) for r in results),
                          vmap_method="broadcast_all")(q, *arrays)


@_kernel_call.defjvp
def _kernel_call_jvp(target, primals, tangents):
  # Reached only by differentiating the custom VJP's own rules: a second derivative.
  del target, primals, tangents
  raise NotImplementedError(
      "attention_kernel='fused_cpu' has first derivatives only: for jax.grad of jax.grad, "
      "use attention_kernel='einsum'")


@jax.custom_vjp
def _fused(q, k, v):
  return _kernel_call(_TARGETS[0], q, k, v)


def _fused_forward(q, k, v):
  q, k, v = q.value, k.value, v.value  # symbolic_zeros=True wraps the primals
  out, weights = _kernel_call(_TARGETS[0], q, k, v)
  return (out, weights), (q, k, v, weights)


def _fused_backward(residuals, cotangents):
  q, k, v, weights = residuals
  d_out, d_weights = cotangents
  if isinstance(d_out, custom_derivatives.SymbolicZero):
    d_out = jnp.zeros(q.shape, jnp.float32)
  # In training nothing reads the weights, so their cotangent is a symbolic zero: skip it.
  if isinstance(d_weights, custom_derivatives.SymbolicZero):
    return _kernel_call(_TARGETS[1], q, k, v, weights, d_out)
  return _kernel_call(_TARGETS[2], q, k, v, weights, d_out, d_weights)


_fused.defvjp(_fused_forward, _fused_backward, symbolic_zeros=True)

