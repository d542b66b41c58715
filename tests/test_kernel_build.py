"""Building the fused attention kernel: the compiler, the cache, the CPU, the fallbacks."""

import os
import platform
import shutil
import time
import warnings

import numpy as np
import pytest
from test_attention import rand

from vit_jax import attention as A
from vit_jax.kernels import build as B
from vit_jax.kernels import fused_attention as F


@pytest.fixture
def unbuildable(monkeypatch, tmp_path):
  """No kernel in the cache and no compiler: `load` must report why."""
  monkeypatch.setenv("VIT_JAX_CACHE_DIR", str(tmp_path))
  monkeypatch.setenv("CXX", "no-such-compiler")
  monkeypatch.setattr(B, "cpu_flags", lambda: "fpu sse2 avx2 fma avx512f")
  F._library.cache_clear()
  F._warn_once.cache_clear()
  yield
  F._library.cache_clear()  # the next load finds the kernel again (targets stay registered)


def test_without_a_compiler_attend_warns_once_and_uses_the_einsum_path(unbuildable):
  q, k, v = (rand(2, 2, 17, 16, seed=s) for s in range(3))
  with pytest.warns(UserWarning, match="no C\\+\\+ compiler 'no-such-compiler'"):
    out, weights = F.attend(q, k, v)
  want_out, want_weights = A.attend(q, k, v)
  np.testing.assert_allclose(out, want_out, rtol=0, atol=0)
  np.testing.assert_allclose(weights, want_weights, rtol=0, atol=0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    F.attend(q, k, v)  # the second call stays quiet


@pytest.fixture
def fake_compiler(monkeypatch, tmp_path):
  """make(script) -> a compiler running the shell `script`, an empty kernel cache in
  tmp_path/cache, and an AVX2 CPU."""
  monkeypatch.setenv("VIT_JAX_CACHE_DIR", str(tmp_path / "cache"))
  (tmp_path / "cache").mkdir()
  monkeypatch.setattr(B, "cpu_flags", lambda: "fpu avx2 fma")  # a Zen 3, say

  def make(script: str) -> str:
    compiler = tmp_path / "cxx"
    compiler.write_text("#!/bin/sh\n" + script)
    compiler.chmod(0o755)
    return str(compiler)
  return make


def test_a_failed_build_is_reported_cached_and_leaves_no_library(fake_compiler, tmp_path):
  calls = tmp_path / "calls"
  # Writes half an output file, then fails, as a compiler that stops midway might.
  compiler = fake_compiler(f"""[ "$1" = --version ] && {{ echo fake 1.0; exit 0; }}
echo compile >> {calls}
while [ $# -gt 1 ]; do [ "$1" = -o ] && echo partial > "$2"; shift; done
echo 'attention_cpu.cc:1: error: no AVX-512 here' >&2
exit 1
""")
  for _ in range(2):  # the second time from the cached failure, without compiling
    with pytest.raises(RuntimeError, match="could not build attention_cpu.cc: .*no AVX-512 here"):
      B.build(compiler)
  assert calls.read_text() == "compile\n"
  assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-built left behind
  (failure,) = (tmp_path / "cache").glob("*.failed")
  with pytest.raises(RuntimeError, match=f"no AVX-512 here \\(cached: {failure}, tried again"):
    B.build(compiler)
  os.utime(failure, (time.time() - (B.FAILURE_HOURS + 1) * 3600,) * 2)  # a day later
  with pytest.raises(RuntimeError, match="no AVX-512 here"):
    B.build(compiler)
  assert calls.read_text() == "compile\ncompile\n"


@pytest.mark.parametrize("dies", [
    "kill -9 $$",  # the driver itself
    "echo 'g++: fatal error: Killed signal terminated program cc1plus' >&2; exit 1",  # the OOM
])  # killer's usual victim is the compiler proper, and the driver exits 1 saying so
def test_a_compiler_killed_by_a_signal_is_not_cached_as_a_failure(fake_compiler, tmp_path,
                                                                  dies):
  compiler = fake_compiler(f"""[ "$1" = --version ] && {{ echo fake 1.0; exit 0; }}
{dies}
""")
  with pytest.raises(RuntimeError, match="was killed while building attention_cpu.cc; the next"):
    B.build(compiler)
  assert not list((tmp_path / "cache").glob("*.failed"))


def test_a_new_build_deletes_cached_builds_unused_for_a_month(fake_compiler, tmp_path, capsys):
  cache = tmp_path / "cache"
  compiler = fake_compiler("""[ "$1" = --version ] && { echo fake 1.0; exit 0; }
while [ $# -gt 1 ]; do [ "$1" = -o ] && echo library > "$2"; shift; done
""")
  day = 24 * 3600
  ages = {"attention_cpu-old.so": 40, "attention_cpu-old.failed": 40,
          "attention_cpu-recent.so": 20, "someone-elses.so": 40}
  for name, days in ages.items():
    (cache / name).write_text("")
    os.utime(cache / name, (time.time() - days * day,) * 2)
  library = B.build(compiler)
  assert "compiling the fused attention kernel" in capsys.readouterr().err  # it takes a while
  assert sorted(p.name for p in cache.iterdir()) == sorted(
      [library.name, "attention_cpu-recent.so", "someone-elses.so"])
  # A build found in the cache counts as used: the next new build keeps it.
  os.utime(library, (time.time() - 40 * day,) * 2)
  assert B.build(compiler) == library
  assert time.time() - library.stat().st_mtime < day
  assert capsys.readouterr().err == ""


def test_another_virtual_environment_with_the_same_jax_takes_the_cached_build(
    fake_compiler, tmp_path, monkeypatch):
  calls = tmp_path / "calls"
  compiler = fake_compiler(f"""[ "$1" = --version ] && {{ echo fake 1.0; exit 0; }}
echo compile >> {calls}
while [ $# -gt 1 ]; do [ "$1" = -o ] && echo library > "$2"; shift; done
""")
  library = B.build(compiler)
  monkeypatch.setattr(B.jax.ffi, "include_dir", lambda: "/elsewhere/.venv/jaxlib/include")
  assert B.build(compiler) == library and calls.read_text() == "compile\n"


def test_a_cpu_without_avx2_is_reported(monkeypatch):
  monkeypatch.setattr(B, "cpu_flags", lambda: "fpu sse2 avx fma")
  with pytest.raises(RuntimeError, match="no AVX2 with FMA"):
    B.build()


@pytest.mark.skipif(not (shutil.which("g++") and platform.machine() == "x86_64"),
                    reason="needs g++ for x86-64")
def test_an_avx512_march_on_a_cpu_without_it_is_refused(fake_compiler, monkeypatch):
  # g++ answers the question of macros; the build itself stops at once.
  compiler = fake_compiler("""case " $* " in *" -dM "*|*" --version "*) exec g++ "$@";; esac
echo 'error: the build itself' >&2; exit 1
""")
  monkeypatch.setenv(B.MARCH_VARIABLE, "x86-64-v4")
  with pytest.raises(RuntimeError, match="x86-64-v4 builds AVX-512 code, which this CPU"):
    B.build(compiler)
  monkeypatch.setenv(B.MARCH_VARIABLE, "x86-64-v3")  # AVX2: this CPU runs it, so it builds
  with pytest.raises(RuntimeError, match="could not build .*the build itself"):
    B.build(compiler)
