"""The command line of `vit_jax.benchmark`: a config's images/s, MFU against this machine's
matmul peak, FLOPs, compile times and memory, and optionally its time to accuracy.

    python -m vit_jax.benchmark --config=experiments/mnist.py --out=bench.json

The package docstring (`vit_jax/benchmark/__init__.py`) says what each figure means.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from pathlib import Path

import jax
from absl import flags
from ml_collections import config_flags

from vit_jax import host_cpu
from vit_jax.benchmark.report import REPO, run, table, time_to_accuracy
from vit_jax.command_line import (
    check_output_file,
    checked_config,
    keep_the_console_for_ours,
    run_command,
    to_console,
)
from vit_jax.files import write_text_atomically


def _stop(signum, frame):
  """On SIGTERM or SIGHUP: the timed run is ended and its temporary folder removed (as the
  exit unwinds), not left training."""
  del frame
  to_console(f"interrupted by signal {signum}; rerun the same command")
  raise SystemExit(128 + signum)


def main(argv):
  del argv
  for stop_signal in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(stop_signal, _stop)
  keep_the_console_for_ours()
  config = checked_config(flags.FLAGS)
  targets = _accuracy_targets()  # a typo costs no measuring
  check_output_file("out", flags.FLAGS.out)
  why_devices = host_cpu.configure(flags.FLAGS.cpu_devices,
                                   (config.batch_size, config.eval_batch_size))
  result = run(config, flags.FLAGS.windows, flags.FLAGS.steps_per_window,
               flags.FLAGS.compile_times, flags.FLAGS.peak_matmul_size or None)
  if jax.default_backend() == "cpu":  # the split is the host CPU's: a GPU run used none of it
    result["devices_chosen"] = why_devices
  if targets:
    _write(result)  # the minutes measured so far are kept, whatever the timed run does
    with tempfile.TemporaryDirectory() as workdir:
      result.update(time_to_accuracy(os.path.abspath(flags.FLAGS["config"].config_filename),
                                     [a for a in sys.argv[1:] if a.startswith("--config.")],
                                     targets, Path(workdir) / "run",
                                     flags.FLAGS.eval_every_steps,
                                     # the devices measured above, unless told otherwise
                                     [f"--cpu_devices={flags.FLAGS.cpu_devices}",
                                      *flags.FLAGS.launch_flags]))
  print(table(result))
  if _write(result):
    print(f"wrote {flags.FLAGS.out}")


def _accuracy_targets() -> list[float]:
  try:
    targets = [float(t) for t in flags.FLAGS.time_to_accuracy]
  except ValueError:
    raise ValueError(f"--time_to_accuracy={','.join(flags.FLAGS.time_to_accuracy)} must be "
                     "accuracies, e.g. 0.98,0.99") from None
  if not all(0 < t <= 1 for t in targets):  # 98 for 0.98 would train without end
    raise ValueError(f"--time_to_accuracy={','.join(flags.FLAGS.time_to_accuracy)} must be "
                     "accuracies in (0, 1], e.g. 0.98,0.99")
  for name in ("eval_every_steps", "launch_flags"):
    if not targets and flags.FLAGS[name].present:
      raise ValueError(f"--{name} is for the timed run of --time_to_accuracy, not given")
  if targets and flags.FLAGS["eval_every_steps"].present and any(
      a.startswith("--config.eval_every_steps=") for a in sys.argv[1:]):  # the latter won
    raise ValueError("--eval_every_steps and --config.eval_every_steps both set the timed "
                     "run's evaluation interval: give one")
  return targets


def _write(result: dict) -> bool:
  """`result` as JSON at --out, if given, whole or not at all."""
  if flags.FLAGS.out:
    write_text_atomically(flags.FLAGS.out, json.dumps(result, indent=2) + "\n")
  return bool(flags.FLAGS.out)


def _define_flags():
  config_flags.DEFINE_config_file("config", str(REPO / "experiments" / "mnist.py"),
                                  "Experiment config to measure.", lock_config=True)
  flags.DEFINE_string("cpu_devices", "auto", "Split the CPU into this many JAX devices, as "
                      "launch.py does ('auto': one per core); an XLA_FLAGS device count wins.")
  flags.DEFINE_integer("windows", 5, "Timed windows (after one warm-up window).",
                       lower_bound=1)
  flags.DEFINE_integer("steps_per_window", 10, "Training steps per timed window.",
                       lower_bound=1)
  flags.DEFINE_bool("compile_times", True, "Measure cold and cached compile times.")
  flags.DEFINE_list("time_to_accuracy", [], "Accuracies to time a real run to, e.g. "
                    "0.98,0.99 (empty: skip): validation accuracy where the config holds "
                    "images out, else test accuracy.")
  flags.DEFINE_integer("eval_every_steps", 100, "Evaluation interval of the timed run.")
  flags.DEFINE_list("launch_flags", [], "Extra launch.py flags for the timed run, e.g. "
                    "--cpu_devices=1.")
  flags.DEFINE_integer("peak_matmul_size", 0, "Side of the square matmul that probes the "
                       "peak (0: 2048 on a CPU, 8192 on a GPU or TPU).", lower_bound=0)
  flags.DEFINE_string("out", None, "Write the results here as JSON.")


if __name__ == "__main__":
  run_command(_define_flags, main)
