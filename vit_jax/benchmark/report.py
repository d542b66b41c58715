"""Every measurement of a config as one JSON-able dict, and time to accuracy."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax

from vit_jax import auto, host_cpu, steps
from vit_jax.benchmark import baseline, ceiling, flops, step_speed, timing
from vit_jax.experiment_config import validate
from vit_jax.metrics import read_metrics
from vit_jax.parallel import Runner, choose_mode

REPO = Path(__file__).resolve().parent.parent.parent
VMAPPED_SEEDS = 3  # a sweep's seeds per setting


def time_to_accuracy(config_path: str, overrides: list[str], targets: list[float],
                     workdir: Path, eval_every_steps: int,
                     launch_flags: list[str] = ()) -> dict[str, float | None]:
  """Wall seconds from starting launch.py until the accuracy first reaches each target: the
  validation accuracy where the config holds out images (the test split is then evaluated
  only at the end), else the test accuracy; `accuracy_timed` says which.

  The run compiles cold: its persistent compilation cache is off unless `launch_flags`
  turn it on again.
  """
  start = time.time()
  # Its own session: a Ctrl-C reaches the benchmark alone, which ends the run (a run in a
  # temporary folder has nothing to resume, nor to be left training after the benchmark).
  timed, status = None, None
  try:
    timed = subprocess.Popen(
        [sys.executable, str(REPO / "launch.py"), f"--config={config_path}",
         f"--workdir={workdir}", f"--config.eval_every_steps={eval_every_steps}",
         "--compilation_cache_dir=", *launch_flags, *overrides], cwd=REPO,
        start_new_session=True)
    status = timed.wait()
  finally:
    if timed is not None:  # the run and whatever it started (a compiler)
      with contextlib.suppress(ProcessLookupError):
        os.killpg(timed.pid, signal.SIGKILL)
      timed.wait()
  if status:
    raise ValueError(f"the timed launch.py run ended with status {status} (its output is "
                     "above)")
  records = read_metrics(workdir)
  held_out = any("validation_accuracy" in r for r in records)
  watched = "validation_accuracy" if held_out else "eval_accuracy"
  evals = [r for r in records if watched in r]
  out: dict[str, Any] = {"accuracy_timed": "validation" if held_out else "test"}
  for target in targets:
    hit = next((r for r in evals if r[watched] >= target), None)
    out[f"seconds_to_{target:g}"] = None if hit is None else hit["time"] - start
    out[f"step_at_{target:g}"] = None if hit is None else hit["step"]
  out["final_accuracy"] = [r for r in records if "eval_accuracy" in r][-1]["eval_accuracy"]
  return out


def run(config: Any, windows: int = 5, steps_per_window: int = 10,
        with_compile_times: bool = True, peak_size: int | None = None) -> dict[str, Any]:
  """Every measurement except time to accuracy, as one JSON-able dict.

  `peak_size`: the side of the peak's matmul; None: `peak_matmul_size` of the platform.
  """
  config = validate(config)
  runner = Runner(choose_mode(config.parallel))
  steps.microbatches_per_step(config, runner)  # batches the devices cannot share fail here
  config, choices = auto.resolve(config, runner.num_devices)
  microbatches = steps.microbatches_per_step(config, runner)
  peak = timing.MatmulPeak(config.model.compute_dtype, peak_size)
  result: dict[str, Any] = {
      "date": time.strftime("%Y-%m-%d"),
      "device": jax.devices()[0].device_kind,
      "num_devices": runner.num_devices,
      **(host_cpu.describe() if jax.default_backend() == "cpu" else {}),
      "choices": choices,
      "compute_dtype": config.model.compute_dtype,
      **_attention_that_ran(config.model.attention_kernel),
      "train_flops_per_image": flops.train_flops(config.model),
      "eval_flops_per_image": flops.forward_flops(config.model),
      "batch_size": config.batch_size,
      "microbatch_size": config.microbatch_size,
      "eval_batch_size": config.eval_batch_size,
  }
  result.update(step_speed.measure_steps(config, runner, peak, steps_per_window, windows))
  result.update(_seeds_as_one(config, runner, peak, steps_per_window, windows,
                              result["train_images_per_sec"]))
  # The ceiling takes the shapes the step takes: a micro-batch, an evaluation pass.
  result.update(ceiling.matmul_only_speed(
      config.model, config.batch_size // microbatches,
      result["eval_images_per_pass"] * runner.num_devices, peak, runner))
  result.update(baseline.measure(config, peak, steps_per_window, windows))
  result["speedup_over_plain_flax"] = (result["train_images_per_sec"]
                                       / result["baseline_train_images_per_sec"])
  result["matmul_peak_size"] = peak.size
  result["matmul_peak_flops"] = statistics.median(peak.measured)
  result["matmul_peak_flops_range"] = [min(peak.measured), max(peak.measured)]
  for measured in ("", "matmul_only_"):
    for key in ("train", "eval"):
      result[f"{measured}{key}_mfu"] = (result[f"{measured}{key}_images_per_sec"]
                                        * result[f"{key}_flops_per_image"]
                                        / result["matmul_peak_flops"])
  if with_compile_times:
    result.update(step_speed.compile_times(config, microbatches))
  result["peak_rss_megabytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return result


def _seeds_as_one(config, runner, peak, steps_per_window: int, windows: int,
                  one_run: float) -> dict[str, float]:
  """A sweep's seeds in one vmapped step (vit_jax.seeds): each seed's images/s against
  `one_run`'s."""
  per_seed = step_speed.seeds_train_images_per_second(config, runner, peak, VMAPPED_SEEDS,
                                                      steps_per_window, windows)
  return {"vmapped_seeds": VMAPPED_SEEDS, "vmapped_train_images_per_sec_per_seed": per_seed,
          "vmapped_seeds_speedup": per_seed / one_run}


def _attention_that_ran(kernel: str) -> dict[str, Any]:
  """The resolved attention path, and the kernel's vector width where it ran (16: its
  AVX-512 build, 8: its AVX2 build); `auto.resolve` refuses a 'fused_cpu' that cannot run."""
  if kernel != "fused_cpu":
    return {"attention_kernel": kernel, "attention_kernel_lanes": None}
  from vit_jax.kernels import fused_attention

  return {"attention_kernel": kernel, "attention_kernel_lanes": fused_attention.lanes()}


def table(result: dict[str, Any]) -> str:
  rows = []
  for key, value in result.items():
    if isinstance(value, float):
      value = f"{value:.4g}"
    rows.append(f"| {key} | {value} |")
  return "| measure | value |\n| --- | --- |\n" + "\n".join(rows) + "\n"
