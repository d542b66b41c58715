"""How fast a config turns compute into accuracy, measured in one process.

    python -m vit_jax.benchmark --config=experiments/mnist.py --out=bench.json
    python -m vit_jax.benchmark --config=experiments/mnist.py --time_to_accuracy=0.98,0.99

Reports, for the config's model and global batch:
- the machine's matmul peak (a large matmul timed here, before every timed window) in the
  model's compute dtype: float32, or for mixed precision bfloat16 operands accumulating
  in float32;
- model FLOPs per training and per evaluation image, counted from the architecture
  and cross-checked against XLA's cost analysis of the compiled steps;
- training and evaluation images/s (median over timed windows after warm-up) and
  the share of the peak they achieve (MFU, against the median of the peak's probes);
- compile time of the training step, cold and from the persistent compilation cache;
- peak resident memory of the process, and the training step's peak on one device as
  XLA's buffer assignment plans it (the step alone: on an accelerator the process's
  device memory also holds the peak's probe);
- optionally, time to accuracy: wall time from starting `launch.py` until the test
  accuracy first reaches each target.
Speed goals live here, never in timed tests.
"""

from __future__ import annotations

import functools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import attention as A
from vit_jax import fused_attention, input_pipeline, train
from vit_jax.experiment_config import ExperimentConfig, validate
from vit_jax.model_configs import ModelConfig
from vit_jax.parallel import Runner, choose_mode

REPO = Path(__file__).resolve().parent.parent


# --- FLOPs ----------------------------------------------------------------------------

def forward_flops(c: ModelConfig) -> int:
  """Multiply-adds x 2 of one image's forward pass (matmuls and attention only)."""
  n = c.num_tokens
  d, p = c.hidden_size, c.patch_size
  qkv = 0 if c.qkv == "identity" else 3 * n * d * d
  per_layer = qkv + 2 * n * n * d + n * d * d + 2 * n * d * c.mlp_dim  # QK^T and AV: 2 n^2 d
  return 2 * (c.num_patches * p * p * c.num_channels * d + c.num_layers * per_layer
              + d * c.num_classes)


def train_flops(c: ModelConfig) -> int:
  """Forward plus backward (twice the forward: gradients for inputs and weights)."""
  return 3 * forward_flops(c)


# --- Measurements ----------------------------------------------------------------------

def peak_matmul_size(platform: str) -> int:
  """Side of the square matmul that probes the peak: large enough to reach it there.

  2048 on a CPU (about 0.1 s a product on the project's 2-core machines); 8192 on a GPU or
  TPU, where a 2048 product (a few microseconds) would time the launch, not the chip (an
  H200 runs 8192-cubed bfloat16 products at about 790 TFLOP/s).
  """
  return 2048 if platform == "cpu" else 8192


class MatmulPeak:
  """FLOP/s of a large square matmul on the default device: the machine's peak.

  Probed before every timed window, so that the probes spread over the whole run: on a
  shared machine the speed of both moves with the neighbours' load, and the median of many
  probes is steadier than one. The product is `attention.products` in `compute_dtype`, as
  the model computes its own.
  """

  def __init__(self, compute_dtype: str = "float32", size: int | None = None):
    if size is None:
      size = peak_matmul_size(jax.devices()[0].platform)
    self.size = size
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
    self.a, self.b = a.astype(compute_dtype), b.astype(compute_dtype)  # rounded once
    self.matmul = jax.jit(functools.partial(A.products, "ij,jk->ik", compute_dtype=compute_dtype))
    self.matmul(self.a, self.b).block_until_ready()
    self.flops = 2 * size**3
    self.measured: list[float] = []

  def probe(self, repeats: int = 3) -> None:
    """Appends to `measured` the FLOP/s of the median of `repeats` timed matmuls."""
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      self.matmul(self.a, self.b).block_until_ready()
      times.append(time.perf_counter() - start)
    self.measured.append(self.flops / statistics.median(times))


def _matmuls_only(params: dict[str, Any], patches: jax.Array, c: ModelConfig) -> jax.Array:
  """The ViT's matmuls alone, in the model's order: no LayerNorm, softmax, GELU or optimizer.

  What XLA makes of the step's matrix products with everything else free of charge: the
  ceiling that a faster LayerNorm, softmax or GELU could approach, but not pass.
  """
  dtype = c.compute_dtype
  x = A.project(patches, params["embed"], compute_dtype=dtype)
  if c.classifier == "token":
    x = jnp.concatenate([x[:, :1], x], axis=1)
  for layer in params["layers"]:
    q, k, v = ((A.chunk_qkv(A.project(x, layer["qkv"], compute_dtype=dtype)))
               if "qkv" in layer else (x, x, x))
    q, k, v = (A.split_heads(t, c.num_heads) for t in (q, k, v))
    scores = A.products("bhqd,bhkd->bhqk", q, k, dtype) / x.shape[1]  # keeps magnitudes steady
    out = A.products("bhqk,bhkd->bhqd", scores, v, dtype)
    x = x + A.project_out(A.merge_heads(out), layer["out"], layer["out_bias"], dtype)
    x = x + A.project(A.project(x, layer["fc1"], compute_dtype=dtype), layer["fc2"],
                      compute_dtype=dtype)
  return A.project(x[:, :1], params["head"], compute_dtype=dtype).sum()


def matmul_only_problem(c: ModelConfig, batch_size: int):
  """(loss, params, patches) for `_matmuls_only`: random weights of the model's shapes.

  `patches` is (batch_size, N, P*P*C); `loss(params, patches)` is a float32 scalar (the
  head's outputs summed, something to differentiate).
  """
  d, m = c.hidden_size, c.mlp_dim
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 8 * c.num_layers + 2))

  def weight(*shape):
    return jax.random.normal(next(keys), shape, jnp.float32) / np.sqrt(shape[0])

  def layer():
    shapes = {"out": (d, d), "fc1": (d, m), "fc2": (m, d)}
    if c.qkv != "identity":
      shapes["qkv"] = (d, 3 * d)
    return {**{k: weight(*s) for k, s in shapes.items()}, "out_bias": jnp.zeros(d)}

  params = {"embed": weight(c.patch_size**2 * c.num_channels, d),
            "layers": [layer() for _ in range(c.num_layers)],
            "head": weight(d, c.num_classes)}
  patches = A.patchify(jax.random.normal(next(keys), (batch_size, c.image_size, c.image_size,
                                                      c.num_channels)), c.patch_size)
  return functools.partial(_matmuls_only, c=c), params, patches


def matmul_only_speed(c: ModelConfig, train_batch: int, eval_batch: int, peak: MatmulPeak,
                      runner: Runner, repeats: int = 10) -> dict[str, float]:
  """Images/s of `_matmuls_only`, with its gradient (train) and without (eval).

  Each pass takes the batch that one pass of the config's step takes (`train_batch`:
  a micro-batch from every device when the step accumulates), and is laid over the devices
  as `runner` lays the config's own step, so that the ceiling and the step it bounds
  multiply the same shapes on the same cores. Each device keeps its own gradient: the
  cross-device mean is not a matmul.
  """
  out = {}
  for key, batch_size in (("train", train_batch), ("eval", eval_batch)):
    loss, params, patches = matmul_only_problem(c, batch_size)
    params, patches = runner.replicate(params), runner.split_batch(np.asarray(patches))
    step = jax.grad(loss) if key == "train" else loss
    fn = runner.compile(lambda p, x, axis_name, step=step: step(p, x), in_axes=(0, 0))
    run_once = functools.partial(fn, params, patches)
    out[f"matmul_only_{key}_images_per_sec"] = _speed(
        lambda run_once=run_once: jax.block_until_ready(run_once()), repeats, batch_size, peak)
  return out


def _speed(run_window, windows: int, images: int, peak: MatmulPeak) -> float:
  """Images/s of `run_window`, which processes `images` images: the median over windows.

  Before each timed window the peak is probed, then the window runs once untimed (which
  also compiles it the first time), to warm the caches again that the probe evicted.
  """
  rates = []
  for _ in range(windows):
    peak.probe()
    run_window()
    start = time.perf_counter()
    run_window()
    rates.append(images / (time.perf_counter() - start))
  return statistics.median(rates)


def _xla_flops(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):  # older JAX: one dict per device program
    analysis = analysis[0]
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def measure_steps(config: ExperimentConfig, runner: Runner, peak: MatmulPeak,
                  steps_per_window: int = 10, windows: int = 5) -> dict[str, Any]:
  """Training and evaluation images/s of `config` on synthetic digits (speed only)."""
  passes = train.passes_per_step(config, runner)
  c = config.model
  # Whole evaluation batches: every evaluated image is a real one.
  eval_batches = -(-config.batch_size * steps_per_window // config.eval_batch_size)
  num_examples = eval_batches * config.eval_batch_size
  rng = np.random.default_rng(0)
  data = {"image": rng.integers(0, 256, (num_examples, c.image_size, c.image_size,
                                         c.num_channels), dtype=np.uint8),
          "label": rng.integers(0, c.num_classes, num_examples).astype(np.int32)}
  device_data = runner.replicate(data)
  holder = {"state": runner.replicate(train.create_train_state(config, total_steps=10_000))}
  order = input_pipeline.EpochOrder(num_examples, config.batch_size, config.seed)
  positions = runner.split_batch(np.arange(config.batch_size, dtype=np.int32))
  key = jax.random.PRNGKey(0)

  step_fn = train.compile_train_step(config, runner)
  start = time.perf_counter()
  compiled = step_fn.lower(holder["state"], device_data, runner.split_batch(order.indices(0)),
                           positions, key).compile()
  compile_seconds = time.perf_counter() - start

  def train_window():
    state = holder["state"]
    for i in range(steps_per_window):
      state, metrics = step_fn(state, device_data, runner.split_batch(order.indices(i)),
                               positions, jax.random.fold_in(key, i))
    jax.block_until_ready(metrics)
    holder["state"] = state

  train_speed = _speed(train_window, windows, config.batch_size * steps_per_window, peak)
  evaluate = train.Evaluator(runner, device_data, num_examples, config.eval_batch_size,
                             config.dataset)
  eval_speed = _speed(lambda: evaluate(holder["state"]), windows, num_examples, peak)
  eval_compiled = evaluate.step.lower(
      holder["state"], device_data,
      runner.split_batch(np.arange(config.eval_batch_size, dtype=np.int32)),
      runner.split_batch(np.ones(config.eval_batch_size, bool))).compile()
  xla_train, xla_eval = _xla_flops(compiled), _xla_flops(eval_compiled)
  memory = compiled.memory_analysis()
  return {
      "parallel": runner.mode,
      "devices": runner.num_devices,
      "train_images_per_sec": train_speed,
      "eval_images_per_sec": eval_speed,
      "train_step_compile_seconds": compile_seconds,
      # Parameters, optimizer state, the device's copy of the data, activations, gradients.
      "train_step_peak_megabytes": memory and memory.peak_memory_in_bytes / 2**20,
      # XLA counts a pmap-ed program once, for one device's share of the batch, and a
      # loop's body once, for one of the step's micro-batch passes (so the work outside
      # the loop, gather and optimizer, about 0.5 %, is counted once per pass here).
      # A custom call is opaque to XLA: with attention_kernel 'fused_cpu' the count lacks
      # the attention's products (QK^T and AV), 16 % of the `seed` step's FLOPs.
      "xla_train_flops_per_image": xla_train and xla_train * passes / (
          config.batch_size / _per_program(runner)),
      "xla_eval_flops_per_image": xla_eval and xla_eval / (config.eval_batch_size
                                                           / _per_program(runner)),
  }


def _per_program(runner: Runner) -> int:
  return runner.num_devices if runner.mode == "pmap" else 1


def compile_times(config: ExperimentConfig, passes: int) -> dict[str, float]:
  """Training-step compile time: cold, then from a fresh persistent compilation cache.

  Compiled for one device, with the `passes` per step that the config has on its own.
  """
  code = (
      "import sys, time, json, jax, numpy as np, functools\n"
      "cache = sys.argv[1]\n"
      "jax.config.update('jax_compilation_cache_dir', cache)\n"
      "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
      "jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)\n"
      "from vit_jax import benchmark, train\n"
      "from vit_jax.experiment_config import validate\n"
      "config = validate(json.loads(sys.argv[2]))\n"
      "print(json.dumps(benchmark.time_one_compile(config)))\n")
  with tempfile.TemporaryDirectory() as cache:
    as_json = json.dumps(_one_device_json(config, passes))
    runs = []
    for _ in range(2):
      done = subprocess.run([sys.executable, "-c", code, cache, as_json], capture_output=True,
                            text=True)
      if done.returncode:
        raise RuntimeError(f"compiling in a subprocess failed: {done.stderr[-2000:]}")
      runs.append(json.loads(done.stdout.splitlines()[-1]))
  return {"compile_cold_seconds": runs[0]["seconds"],
          "compile_cached_seconds": runs[1]["seconds"]}


def _one_device_json(config: ExperimentConfig, passes: int) -> dict:
  import dataclasses

  return dataclasses.asdict(dataclasses.replace(
      config, parallel="jit", microbatch_size=config.batch_size // passes))


def time_one_compile(config: ExperimentConfig) -> dict[str, float]:
  """Lower and compile the single-device training step once; for `compile_times`."""
  state = train.create_train_state(config, total_steps=10_000)
  c = config.model
  data = {"image": np.zeros((config.batch_size, c.image_size, c.image_size, c.num_channels),
                            np.uint8), "label": np.zeros(config.batch_size, np.int32)}
  step = train.compile_train_step(config, Runner("jit"))
  idx = np.arange(config.batch_size, dtype=np.int32)
  start = time.perf_counter()
  step.lower(state, data, idx, idx, jax.random.PRNGKey(0)).compile()
  return {"seconds": time.perf_counter() - start}


def time_to_accuracy(config_path: str, overrides: list[str], targets: list[float],
                     workdir: Path, eval_every_steps: int,
                     launch_flags: list[str] = ()) -> dict[str, float | None]:
  """Wall seconds from starting launch.py until the test accuracy first reaches each target.

  The run compiles cold: its persistent compilation cache is off unless `launch_flags`
  turn it on again.
  """
  start = time.time()
  subprocess.run([sys.executable, str(REPO / "launch.py"), f"--config={config_path}",
                  f"--workdir={workdir}", f"--config.eval_every_steps={eval_every_steps}",
                  "--compilation_cache_dir=",
                  *launch_flags, *overrides], check=True, cwd=REPO)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in records if "eval_accuracy" in r]
  out = {}
  for target in targets:
    hit = next((r for r in evals if r["eval_accuracy"] >= target), None)
    out[f"seconds_to_{target:g}"] = None if hit is None else hit["time"] - start
    out[f"step_at_{target:g}"] = None if hit is None else hit["step"]
  out["final_accuracy"] = evals[-1]["eval_accuracy"]
  return out


def run(config: Any, windows: int = 5, steps_per_window: int = 10,
        with_compile_times: bool = True, peak_size: int | None = None) -> dict[str, Any]:
  """Every measurement except time to accuracy, as one JSON-able dict.

  `peak_size`: the side of the peak's matmul; None: `peak_matmul_size` of the platform.
  """
  config = validate(config)
  peak = MatmulPeak(config.model.compute_dtype, peak_size)
  # What ran: 'fused_cpu' falls back to 'einsum' off CPUs and where it cannot be built.
  fused = config.model.attention_kernel == "fused_cpu" and fused_attention.available()
  result: dict[str, Any] = {
      "date": time.strftime("%Y-%m-%d"),
      "device": jax.devices()[0].device_kind,
      "compute_dtype": config.model.compute_dtype,
      "attention_kernel": "fused_cpu" if fused else "einsum",
      # 16: the kernel's AVX-512 build, 8: its AVX2 build.
      "attention_kernel_lanes": fused_attention.lanes() if fused else None,
      "train_flops_per_image": train_flops(config.model),
      "eval_flops_per_image": forward_flops(config.model),
      "batch_size": config.batch_size,
      "microbatch_size": config.microbatch_size,
      "eval_batch_size": config.eval_batch_size,
  }
  runner = Runner(choose_mode(config.parallel))
  passes = train.passes_per_step(config, runner)
  result.update(measure_steps(config, runner, peak, steps_per_window, windows))
  result.update(matmul_only_speed(config.model, config.batch_size // passes,
                                  config.eval_batch_size, peak, runner))
  result["matmul_peak_size"] = peak.size
  result["matmul_peak_flops"] = statistics.median(peak.measured)
  result["matmul_peak_flops_range"] = [min(peak.measured), max(peak.measured)]
  for measured in ("", "matmul_only_"):
    for key in ("train", "eval"):
      result[f"{measured}{key}_mfu"] = (result[f"{measured}{key}_images_per_sec"]
                                        * result[f"{key}_flops_per_image"]
                                        / result["matmul_peak_flops"])
  if with_compile_times:
    result.update(compile_times(config, passes))
  result["peak_rss_megabytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return result


def table(result: dict[str, Any]) -> str:
  rows = []
  for key, value in result.items():
    if isinstance(value, float):
      value = f"{value:.4g}"
    rows.append(f"| {key} | {value} |")
  return "| measure | value |\n| --- | --- |\n" + "\n".join(rows) + "\n"


def main(argv):
  del argv
  import logging

  from absl import flags

  logging.getLogger("absl").setLevel(logging.WARNING)
  config_flags_value = flags.FLAGS.config
  result = run(config_flags_value, flags.FLAGS.windows, flags.FLAGS.steps_per_window,
               flags.FLAGS.compile_times, flags.FLAGS.peak_matmul_size or None)
  targets = [float(t) for t in flags.FLAGS.time_to_accuracy]
  if targets:
    with tempfile.TemporaryDirectory() as workdir:
      result.update(time_to_accuracy(flags.FLAGS["config"].config_filename,
                                     [a for a in sys.argv[1:] if a.startswith("--config.")],
                                     targets, Path(workdir) / "run",
                                     flags.FLAGS.eval_every_steps, flags.FLAGS.launch_flags))
  print(table(result))
  if flags.FLAGS.out:
    Path(flags.FLAGS.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {flags.FLAGS.out}")


def _define_flags():
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", str(REPO / "experiments" / "mnist.py"),
                                  "Experiment config to measure.", lock_config=True)
  flags.DEFINE_integer("windows", 5, "Timed windows (after one warm-up window).")
  flags.DEFINE_integer("steps_per_window", 10, "Training steps per timed window.")
  flags.DEFINE_bool("compile_times", True, "Measure cold and cached compile times.")
  flags.DEFINE_list("time_to_accuracy", [], "Test accuracies to time a real run to, e.g. "
                    "0.98,0.99 (empty: skip).")
  flags.DEFINE_integer("eval_every_steps", 100, "Evaluation interval of the timed run.")
  flags.DEFINE_list("launch_flags", [], "Extra launch.py flags for the timed run, e.g. "
                    "--cpu_devices=2.")
  flags.DEFINE_integer("peak_matmul_size", 0, "Side of the square matmul that probes the "
                       "peak (0: 2048 on a CPU, 8192 on a GPU or TPU).", lower_bound=0)
  flags.DEFINE_string("out", None, "Write the results here as JSON.")


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
