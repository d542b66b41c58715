"""The training and evaluation steps of a config, timed, and their compile times."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

from vit_jax import inference, input_pipeline, steps, train_state
from vit_jax.benchmark import flops, timing
from vit_jax.experiment_config import ExperimentConfig
from vit_jax.parallel import Runner
from vit_jax.seeds import stack


def synthetic_digits(config: ExperimentConfig, num_examples: int) -> dict[str, np.ndarray]:
  """Random uint8 images and labels of the config's shapes, and where it distils a teacher's
  probabilities ('teacher' (N, K)): speed needs no real data."""
  c = config.model
  rng = np.random.default_rng(0)
  data = {"image": rng.integers(0, 256, (num_examples, c.image_size, c.image_size,
                                         c.num_channels), dtype=np.uint8),
          "label": rng.integers(0, c.num_classes, num_examples).astype(np.int32)}
  if config.distill_weight:
    data["teacher"] = rng.dirichlet(np.ones(c.num_classes), num_examples).astype(np.float32)
  return data


def measure_steps(config: ExperimentConfig, runner: Runner, peak: timing.MatmulPeak,
                  steps_per_window: int = 10, windows: int = 5) -> dict[str, Any]:
  """Training and evaluation images/s of `config` on synthetic digits (speed only)."""
  # Whole evaluation batches: every evaluated image is a real one.
  eval_batches = -(-config.batch_size * steps_per_window // config.eval_batch_size)
  num_examples = eval_batches * config.eval_batch_size
  digits = synthetic_digits(config, num_examples)
  device_data = runner.replicate(digits)
  train_window, holder, compiled, compile_seconds = training_window(
      config, runner, device_data, num_examples, steps_per_window)
  # Evaluation as training and --mode=eval run it, with one view of each image (the FLOP
  # count's).
  evaluate = inference.split_evaluator(
      dataclasses.replace(config, eval_max_shift=0, eval_flip=False), runner, digits)
  return {
      "parallel": runner.mode,
      "devices": runner.num_devices,
      "train_images_per_sec": timing.images_per_second(
          train_window, windows, config.batch_size * steps_per_window, peak),
      "eval_images_per_sec": timing.images_per_second(
          lambda: evaluate(holder["state"]), windows, num_examples, peak),
      "train_step_compile_seconds": compile_seconds,
      "eval_images_per_pass": evaluate.device_images_per_pass,
      # An evaluation with the config's test-time views costs this many times the one timed.
      "eval_views_timed": 1,
      "eval_views_of_config": input_pipeline.num_evaluation_views(config.eval_max_shift,
                                                                  config.eval_flip),
      **_compiled_costs(config, runner, compiled, evaluate, holder["state"], device_data),
  }


def seeds_train_images_per_second(config: ExperimentConfig, runner: Runner,
                                  peak: timing.MatmulPeak, num_seeds: int,
                                  steps_per_window: int = 10, windows: int = 5) -> float:
  """Training images/s per seed with `num_seeds` seeds in one vmapped step (`vit_jax.seeds`):
  against `train_images_per_sec`, what training a sweep's seeds as one gains or loses."""
  num_examples = config.batch_size * steps_per_window
  device_data = runner.replicate(synthetic_digits(config, num_examples))
  train_window, *_ = training_window(config, runner, device_data, num_examples, steps_per_window,
                               num_seeds)
  return timing.images_per_second(train_window, windows, config.batch_size * steps_per_window,
                                  peak)


def training_window(config: ExperimentConfig, runner: Runner, device_data: Any, num_examples: int,
                    steps_per_window: int, num_seeds: int = 0):
  """-> (a window of training steps, `config.steps_per_call` a call with its arguments made as
  `loop.step_through` makes them (no call ends early: the window neither logs, evaluates nor
  checkpoints), the holder of its state, the compiled call, its compile seconds); with
  `num_seeds`, that many seeds' states stacked, a data order each."""
  seeds = range(num_seeds or 1)
  states = [train_state.create_train_state(dataclasses.replace(config, seed=s), total_steps=10_000)
            for s in seeds]
  holder = {"state": runner.replicate(stack(states) if num_seeds else states[0])}
  orders = [input_pipeline.EpochOrder(num_examples, config.batch_size, s) for s in seeds]
  positions = runner.split_batch(np.arange(config.batch_size, dtype=np.int32))
  keys = np.stack([np.asarray(jax.random.PRNGKey(s)) for s in seeds])
  key = keys if num_seeds else keys[0]
  per_call = config.steps_per_call

  def indices(i):
    both = np.stack([order.indices(i) for order in orders], axis=1)
    return both if num_seeds else both[:, 0]

  def arguments(first, count):  # as `loop.step_through` hands them over
    return (runner.split_batch(steps.call_indices(indices, first, count, per_call)), positions,
            key, np.int32(count))

  step_fn = steps.compile_train_steps(config, runner, seeds=bool(num_seeds))
  start = time.perf_counter()
  compiled = step_fn.lower(holder["state"], device_data, *arguments(0, 1)).compile()
  compile_seconds = time.perf_counter() - start

  def train_window():
    state = holder["state"]
    for first in range(0, steps_per_window, per_call):
      state, metrics = step_fn(state, device_data,
                               *arguments(first, min(per_call, steps_per_window - first)))
    jax.block_until_ready(metrics)
    holder["state"] = state

  return train_window, holder, compiled, compile_seconds


def _compiled_costs(config: ExperimentConfig, runner: Runner, compiled, evaluate, state,
                    device_data) -> dict[str, float | None]:
  """XLA's FLOPs per image of the compiled steps, and the training step's peak memory."""
  eval_compiled = evaluate.step.lower(
      state, device_data,
      runner.split_batch(np.arange(config.eval_batch_size, dtype=np.int32)),
      runner.split_batch(np.ones(config.eval_batch_size, bool))).compile()
  xla_train, xla_eval = flops.xla_flops(compiled), flops.xla_flops(eval_compiled)
  per_program = 1 if runner.mode == "jit" else runner.num_devices  # pmap and sharded jit
  memory = compiled.memory_analysis()
  return {
      # Parameters, optimizer state, the device's copy of the data, activations, gradients.
      "train_step_peak_megabytes": memory and memory.peak_memory_in_bytes / 2**20,
      # XLA counts a pmap-ed or sharded program once, for one device's share of the batch, and a
      # loop's body once: one step of a call's loop over its steps, and in it one of the step's
      # micro-batches or evaluation passes (so the work outside the micro-batches' loop,
      # gather and optimizer, is counted once a pass). A custom call is
      # opaque to XLA: with attention_kernel 'fused_cpu' the count lacks the attention's
      # products (QK^T and AV).
      "xla_train_flops_per_image": xla_train and xla_train
      * steps.microbatches_per_step(config, runner) / (config.batch_size / per_program),
      "xla_eval_flops_per_image": xla_eval and xla_eval * evaluate.num_passes
      / (config.eval_batch_size / per_program),
  }


def compile_times(config: ExperimentConfig, microbatches: int) -> dict[str, float]:
  """Training-step compile time: cold, then from a fresh persistent compilation cache.

  Compiled for one device, with the `microbatches` per step that the config has on its own.
  """
  code = (
      "import sys, time, json, jax, numpy as np, functools\n"
      "cache = sys.argv[1]\n"
      "jax.config.update('jax_compilation_cache_dir', cache)\n"
      "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
      "jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)\n"
      "from vit_jax.benchmark import step_speed\n"
      "from vit_jax.experiment_config import validate\n"
      "config = validate(json.loads(sys.argv[2]))\n"
      "print(json.dumps(step_speed.time_one_compile(config)))\n")
  with tempfile.TemporaryDirectory() as cache:
    as_json = json.dumps(_one_device_json(config, microbatches))
    runs = []
    for _ in range(2):
      done = subprocess.run([sys.executable, "-c", code, cache, as_json], capture_output=True,
                            text=True)
      if done.returncode:
        raise RuntimeError(f"compiling in a subprocess failed: {done.stderr[-2000:]}")
      runs.append(json.loads(done.stdout.splitlines()[-1]))
  return {"compile_cold_seconds": runs[0]["seconds"],
          "compile_cached_seconds": runs[1]["seconds"]}


def _one_device_json(config: ExperimentConfig, microbatches: int) -> dict:
  return dataclasses.asdict(dataclasses.replace(
      config, parallel="jit", microbatch_size=config.batch_size // microbatches))


def time_one_compile(config: ExperimentConfig) -> dict[str, float]:
  """Lower and compile the single-device training call once; for `compile_times`."""
  state = train_state.create_train_state(config, total_steps=10_000)
  data = synthetic_digits(config, config.batch_size)
  step = steps.compile_train_steps(config, Runner("jit"))
  idx = np.arange(config.batch_size, dtype=np.int32)
  start = time.perf_counter()
  step.lower(state, data, np.stack([idx] * config.steps_per_call, axis=1), idx,
             jax.random.PRNGKey(0), np.int32(1)).compile()
  return {"seconds": time.perf_counter() - start}
