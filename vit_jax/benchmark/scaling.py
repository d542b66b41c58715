"""How the step's cost grows with the work: images/s and MFU against heads, tokens, width
and batch, each varied alone from one config, all measured in one process.

    python -m vit_jax.benchmark.scaling --out=scaling.json

Every variant is resolved as a run would resolve it (`vit_jax.auto`: the attention path is
chosen for its own heads) and timed against the same matmul peak. On a shared machine rows
measured a minute apart may differ by more than their configs do, so `heads_16_over_4`, the
16-head step's training images/s over the 4-head one's at the base width (the head-count
sweep's worst case), is measured apart, the two steps' windows interleaved.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
from absl import flags
from ml_collections import config_flags

from vit_jax import auto, host_cpu
from vit_jax.benchmark import flops, step_speed, timing
from vit_jax.benchmark.report import REPO
from vit_jax.command_line import (
    check_output_file,
    checked_config,
    keep_the_console_for_ours,
    run_command,
)
from vit_jax.experiment_config import ExperimentConfig, validate
from vit_jax.files import write_text_atomically
from vit_jax.kernels import timing as kernel_timing
from vit_jax.parallel import Runner, choose_mode

# (what varies, its values): each row changes one thing of the base config.
AXES = {"num_heads": (1, 2, 4, 8, 16), "patch_size": (7, 4, 2),
        "hidden_size": (32, 64, 128), "batch_size": (64, 128, 256)}


def variant(config: ExperimentConfig, axis: str, value: int) -> ExperimentConfig:
  """`config` with one field changed (a model field or the batch); the MLP keeps its ratio."""
  if axis == "batch_size":
    return dataclasses.replace(config, batch_size=value)
  changes = {axis: value}
  if axis == "patch_size":  # an overlap may not exceed the patch it surrounds
    changes["patch_overlap"] = min(config.model.patch_overlap, value)
  if axis == "hidden_size":
    changes["mlp_dim"] = config.model.mlp_dim * value // config.model.hidden_size
  return dataclasses.replace(config, model=dataclasses.replace(config.model, **changes))


def measure(config: ExperimentConfig, runner: Runner, peak: timing.MatmulPeak,
            steps_per_window: int, windows: int) -> dict[str, Any]:
  """One row: the variant's choices, images/s and FLOPs per image (`with_mfu` adds MFU)."""
  config, choices = auto.resolve(config, runner.num_devices)
  speed = step_speed.measure_steps(config, runner, peak, steps_per_window, windows)
  c = config.model
  return {
      "heads": c.num_heads, "head_dim": c.head_dim, "tokens": c.num_tokens,
      "width": c.hidden_size, "batch": config.batch_size,
      "attention": c.attention_kernel, "choices": choices,
      "train_images_per_sec": speed["train_images_per_sec"],
      "eval_images_per_sec": speed["eval_images_per_sec"],
      "train_flops_per_image": flops.train_flops(c),
      "eval_flops_per_image": flops.forward_flops(c),
  }


def with_mfu(row: dict[str, Any], peak_flops: float) -> dict[str, Any]:
  """`row` with its training and evaluation MFU against `peak_flops`."""
  return {**row, **{f"{key}_mfu": row[f"{key}_images_per_sec"] * row[f"{key}_flops_per_image"]
                    / peak_flops for key in ("train", "eval")}}


def run(config: ExperimentConfig, steps_per_window: int = 10, windows: int = 3,
        axes: dict[str, tuple[int, ...]] = AXES,
        after_row: Callable[[dict[str, Any]], None] = lambda result: None) -> dict[str, Any]:
  """Every row of `axes`, with the machine's description and the 16-over-4-heads ratio.

  `after_row` is called with the result so far after each row (e.g. to keep it on disk).
  """
  config = validate(config)
  runner = Runner(choose_mode(config.parallel))
  # Every row computes in the precision the base config resolves to, the peak's too.
  peak = timing.MatmulPeak(auto.choose_compute_dtype(config.model)[0])
  rows = []
  for axis, value, varied in _variants(config, axes):  # a shape that cannot be is said first
    start = time.perf_counter()
    row = {"varied": axis, **measure(varied, runner, peak, steps_per_window, windows)}
    print(f"{axis}={value}: {row['train_images_per_sec']:.0f} training images/s, "
          f"{row['attention']} ({time.perf_counter() - start:.0f} s)", flush=True)
    rows.append(row)
    after_row(_so_far(rows, peak, runner))
  result = _so_far(rows, peak, runner)
  heads = axes.get("num_heads", ())
  if 4 in heads and 16 in heads:
    result["heads_16_over_4"] = interleaved_speedup(
        variant(config, "num_heads", 4), variant(config, "num_heads", 16), runner,
        steps_per_window)
  return result


def _variants(config: ExperimentConfig, axes: dict[str, tuple[int, ...]]
              ) -> list[tuple[str, int, ExperimentConfig]]:
  """(axis, value, the variant) of every row, all built before any is measured: one that
  cannot be (6 heads at width 32) is refused in one line naming its row, not after an hour."""
  rows = []
  for axis, values in axes.items():
    for value in values:
      try:
        rows.append((axis, value, variant(config, axis, value)))
      except ValueError as e:
        raise ValueError(f"the scaling row {axis}={value}: {e}") from None
  return rows


def _so_far(rows: list[dict[str, Any]], peak: timing.MatmulPeak, runner: Runner
            ) -> dict[str, Any]:
  peak_flops = statistics.median(peak.measured)  # every row against the one peak
  return {"date": time.strftime("%Y-%m-%d"), "num_devices": runner.num_devices,
          **(host_cpu.describe() if jax.default_backend() == "cpu" else {}),
          "matmul_peak_flops": peak_flops,
          "rows": [with_mfu(row, peak_flops) for row in rows]}


def interleaved_speedup(first: ExperimentConfig, second: ExperimentConfig, runner: Runner,
                        steps_per_window: int = 10, rounds: int = 10) -> float:
  """Training images/s of `second` over `first` (the same batch), their windows alternating
  `rounds` times in this process, in both orders (`kernels.timing.alternating_ratio`). A
  neighbour's load on a shared machine then weighs on both alike, where rows measured minutes
  apart can differ by half."""
  windows = []
  for config in (first, second):
    config, _ = auto.resolve(config, runner.num_devices)
    num_examples = config.batch_size * steps_per_window
    data = runner.replicate(step_speed.synthetic_digits(config, num_examples))
    window, *_ = step_speed.training_window(config, runner, data, num_examples,
                                            steps_per_window)
    window()  # compiled and warm
    windows.append(window)
  return kernel_timing.alternating_ratio(*windows, rounds)


def table(result: dict[str, Any]) -> str:
  """The rows as a markdown table."""
  lines = ["| varied | heads x dim | tokens | width | batch | attention | training images/s "
           "| training MFU | evaluation images/s | evaluation MFU |", "|" + " --- |" * 10]
  for r in result["rows"]:
    lines.append(f"| {r['varied']} | {r['heads']} x {r['head_dim']} | {r['tokens']} | "
                 f"{r['width']} | {r['batch']} | {r['attention']} | "
                 f"{r['train_images_per_sec']:,.0f} | {100 * r['train_mfu']:.1f} % | "
                 f"{r['eval_images_per_sec']:,.0f} | {100 * r['eval_mfu']:.1f} % |")
  return "\n".join(lines)


def main(argv):
  del argv
  keep_the_console_for_ours()
  config = checked_config(flags.FLAGS)
  check_output_file("out", flags.FLAGS.out)
  why_devices = host_cpu.configure(flags.FLAGS.cpu_devices, (config.batch_size,
                                                             config.eval_batch_size))
  print(why_devices)
  def write(result):  # after every row: an interrupted table keeps the rows it measured
    if jax.default_backend() == "cpu":  # as `python -m vit_jax.benchmark` records it
      result["devices_chosen"] = why_devices
    if flags.FLAGS.out:
      write_text_atomically(flags.FLAGS.out, json.dumps(result, indent=2) + "\n")

  result = run(config, flags.FLAGS.steps_per_window, flags.FLAGS.windows, after_row=write)
  write(result)
  print(table(result))
  if "heads_16_over_4" in result:
    print(f"16 heads over 4 heads, training images/s: {result['heads_16_over_4']:.2f}x")


def _define_flags():
  config_flags.DEFINE_config_file("config", str(REPO / "experiments" / "mnist.py"),
                                  "The base config.", lock_config=True)
  flags.DEFINE_string("cpu_devices", "auto", "As launch.py's.")
  flags.DEFINE_integer("windows", 3, "Timed windows per row.", lower_bound=1)
  flags.DEFINE_integer("steps_per_window", 10, "Training steps per window (10: one call of the "
                       "default steps_per_call).", lower_bound=1)
  flags.DEFINE_string("out", None, "Write the rows as JSON here (after every row).")


if __name__ == "__main__":
  run_command(_define_flags, main)
