"""Builds the fused attention kernel (`attention_cpu.cc`) with the machine's C++ compiler.

The kernel is compiled on first use (`g++ -O3 -march=native`, or $VIT_JAX_KERNEL_MARCH)
and cached under ~/.cache/vit_jax (or $VIT_JAX_CACHE_DIR), keyed by its source, the
compiler and its version, JAX, jaxlib and the CPU's flags. A failed build is cached for a
day, so it is not retried by every process (a compiler killed by a signal, e.g. for memory,
is not cached), and builds unused for 30 days are deleted when a new one is made. It is
built for AVX-512 (16-float vectors) or, on CPUs without it, AVX2 with FMA (8-float
vectors); the tests build `x86-64-v3` (AVX2) on AVX-512 machines too.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax

from vit_jax.files import replaced_atomically, write_text_atomically
from vit_jax.host_cpu import cpu_flags

SOURCE = Path(__file__).with_name("attention_cpu.cc")
MARCH_VARIABLE = "VIT_JAX_KERNEL_MARCH"
UNUSED_DAYS = 30  # a cached build unused this long is deleted by the next new build
FAILURE_HOURS = 24  # a cached failure this old is tried again
_KILLED = "Killed signal terminated program"  # g++ and clang, when their compiler proper dies


def cache_dir() -> Path:
  return Path(os.environ.get("VIT_JAX_CACHE_DIR", Path.home() / ".cache" / "vit_jax"))


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
  # Not the headers' folder, which is inside each virtual environment: jaxlib's version says
  # which headers they are, so every checkout and venv on a machine shares one build.
  for part in (SOURCE.read_text(), compiler, version, *[f for f in flags if f[:2] != "-I"],
               jax.__version__, importlib.metadata.version("jaxlib"), cpu):
    key.update(part.encode() + b"\0")
  library = cache_dir() / f"attention_cpu-{key.hexdigest()[:16]}.so"
  failure = library.with_suffix(".failed")
  if library.exists():
    _mark_used(library)
    return library
  if failure.exists() and time.time() - failure.stat().st_mtime < FAILURE_HOURS * 3600:
    raise RuntimeError(f"{failure.read_text()} (cached: {failure}, tried again after "
                       f"{FAILURE_HOURS} hours or once deleted)")
  library.parent.mkdir(parents=True, exist_ok=True)
  print(f"vit_jax: compiling the fused attention kernel (-march={march}), once per machine, "
        f"into {library.parent}", file=sys.stderr, flush=True)
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
  # Concurrent first uses never load half a file.
  with replaced_atomically(library) as partial:
    done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(partial)],
                          capture_output=True, text=True, check=False)
    if done.returncode < 0 or _KILLED in done.stderr:  # e.g. for memory: not the source's fault
      raise RuntimeError(f"{compiler} was killed while building {SOURCE.name}; the next "
                         "process tries again")
    if done.returncode:
      errors = [line for line in done.stderr.splitlines() if "error" in line]
      why = (f"{compiler} could not build {SOURCE.name}: "
             f"{(errors or done.stderr.splitlines() or ['no message'])[0]}")
      write_text_atomically(failure, why)
      raise RuntimeError(why)


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
