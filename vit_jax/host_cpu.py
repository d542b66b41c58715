"""The host CPU: its cores, its model and vector extensions, and the JAX devices it is split
into, decided before JAX starts its backends.

XLA reads `--xla_force_host_platform_device_count` from XLA_FLAGS once, when JAX first
initialises a backend, so `split_cpu` must run before anything asks JAX for its devices.
One device per core trains data-parallel over the cores (docs/performance.md measures it
against one device using XLA's threads: 1.25x on two cores, and four devices on two cores
0.8x). On a GPU or TPU the count changes nothing.

Layer 0 of vit_jax: the standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path

AUTO = "auto"
_FLAG = "--xla_force_host_platform_device_count"


# The extensions that decide what runs fast: the kernel's builds (AVX2 with FMA, AVX-512) and
# bfloat16 matrix units (AVX-512 BF16, AMX).
VECTOR_EXTENSIONS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")


def _cpuinfo_field(name: str) -> str:
  """The first `name : value` of /proc/cpuinfo ('' where there is none)."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.split(":", 1)[0].strip() == name:
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


def cpu_flags() -> str:
  """The CPU's feature flags as /proc/cpuinfo lists them ('' where there is none)."""
  return _cpuinfo_field("flags")


def has_bfloat16_units() -> bool:
  """Whether the CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX)."""
  return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags().split()))


def describe() -> dict[str, object]:
  """The CPU's model, cores and vector extensions, for measured figures to name.

  `cpu_signature` tells apart what a hypervisor names alike ('AMD EPYC': Zen 1 to 4);
  it may be masked too, so the extensions are listed as well.
  """
  flags = set(cpu_flags().split())
  signature = " ".join(f"{name.split()[-1]} {value}" for name in ("cpu family", "model",
                                                                  "stepping")
                       if (value := _cpuinfo_field(name)))
  return {"cpu_model": _cpuinfo_field("model name") or "unknown",
          "cpu_signature": signature or "unknown", "cpu_cores": cores(),
          "cpu_extensions": [x for x in VECTOR_EXTENSIONS if x in flags]}


def cores() -> int:
  """The cores this process may run on (its CPU affinity, which containers and taskset set)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def count(value: str, shares: tuple[int, ...] = ()) -> tuple[int, str]:
  """`--cpu_devices`'s value -> (devices, why), or a one-line ValueError.

  'auto': one device per core, or fewer where needed so that every size in `shares` (the
  training and evaluation batches, which the devices split evenly) divides by the count.
  """
  if value != AUTO:
    try:
      devices = int(value)
    except ValueError:
      devices = 0
    if devices < 1:
      raise ValueError(f"--cpu_devices={value!r} must be 'auto' or a positive integer")
    return devices, "as configured"
  available = cores()
  devices = max(n for n in range(1, available + 1) if all(s % n == 0 for s in shares))
  if devices == available:
    return devices, f"auto: one per core, {available} core{'s' * (available > 1)}"
  return devices, (f"auto: {available} cores, but the batches ({', '.join(map(str, shares))}) "
                   f"divide evenly over at most {devices}")


def forced_by_environment() -> int | None:
  """The device count XLA_FLAGS already forces, if any: an explicit setting wins."""
  for flag in os.environ.get("XLA_FLAGS", "").split():
    if flag.startswith(_FLAG + "="):
      value = flag.split("=", 1)[1]
      if not value.isdigit():
        raise ValueError(f"XLA_FLAGS sets {_FLAG}={value!r}, not a whole number of devices")
      return int(value)
  return None


def split_cpu(devices: int) -> None:
  """Make JAX's CPU backend `devices` devices. Call before JAX initialises a backend."""
  if devices > 1 and forced_by_environment() is None:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}={devices}").strip()


def configure(value: str, shares: tuple[int, ...] = ()) -> str:
  """`count` then `split_cpu`; -> the reason, for the run's first line."""
  if (forced := forced_by_environment()) is not None:
    return f"XLA_FLAGS forces {forced}"
  devices, why = count(value, shares)
  split_cpu(devices)
  return why
