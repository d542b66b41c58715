"""The benchmark's commands: `python -m vit_jax.benchmark` and its timed run, and the GPU
scripts of experiments/ run here on the CPU."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from vit_jax import benchmark
from vit_jax.metrics import read_metrics


@pytest.mark.slow
def test_benchmark_command_writes_json(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = tmp_path / "bench.json"
  result = subprocess.run(
      [sys.executable, "-m", "vit_jax.benchmark", "--config=experiments/tiny.py", "--windows=1",
       "--steps_per_window=1", "--nocompile_times", "--config.model.compute_dtype=bfloat16",
       "--peak_matmul_size=512", f"--out={out}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| train_images_per_sec |" in result.stdout
  written = json.loads(out.read_text())
  assert written["batch_size"] == 128 and written["compute_dtype"] == "bfloat16"
  assert written["matmul_peak_size"] == 512
  # The CPU and the devices the figures came from: one per core unless told otherwise.
  assert written["cpu_cores"] >= 1 and isinstance(written["cpu_extensions"], list)
  assert written["num_devices"] == written["cpu_cores"] or "divide" in written["devices_chosen"]
  # tiny.py asks for the einsum attention; the kernel's width is recorded only when it ran.
  assert written["attention_kernel"] == "einsum" and written["attention_kernel_lanes"] is None


@pytest.mark.parametrize("flag", ["--eval_every_steps=10", "--launch_flags=--cpu_devices=1"])
def test_the_timed_run_s_flags_without_a_timed_run_are_refused(flag):
  ended = subprocess.run([sys.executable, "-m", "vit_jax.benchmark",
                          "--config=experiments/tiny.py", flag],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
  name = flag.split("=")[0]
  assert ended.returncode == 2
  assert f"error: {name} is for the timed run of --time_to_accuracy, not given" in ended.stderr


@pytest.mark.slow
@pytest.mark.parametrize("held_out", [0, 256])
def test_time_to_accuracy_reads_a_real_run(tmp_path, tfds_dir, held_out):
  overrides = [f"--config.tfds_data_dir={tfds_dir}", "--config.train_examples=1024",
               "--config.num_epochs=1", f"--config.validation_examples={held_out}"]
  result = benchmark.time_to_accuracy("experiments/tiny.py", overrides, [0.05, 0.999],
                                      tmp_path / "run", eval_every_steps=4,
                                      launch_flags=["--cpu_devices=2"])
  # Held out, the test split is evaluated only at the end: the validation split is timed.
  assert result["accuracy_timed"] == ("validation" if held_out else "test")
  assert result["step_at_0.05"] == 4  # the first evaluation already beats chance / 2
  assert 0 < result["seconds_to_0.05"] < 300
  assert result["seconds_to_0.999"] is None and result["step_at_0.999"] is None
  last = [r for r in read_metrics(tmp_path / "run") if "eval_accuracy" in r][-1]  # test, at the end
  assert last["step"] == 8 and result["final_accuracy"] == last["eval_accuracy"]
  assert result["final_accuracy"] > 0.2  # it learned (0.30-0.36 here; a constant <= 0.1135)
  with pytest.raises(ValueError, match=r"the timed launch.py run ended with status [12] \(its"):
    benchmark.time_to_accuracy("experiments/no_such_config.py", overrides, [0.5],
                               tmp_path / "failed", eval_every_steps=4)


@pytest.mark.slow
def test_a_stopped_benchmark_ends_its_timed_run_and_leaves_no_folder(tmp_path, tfds_dir):
  import signal
  import time

  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "TMPDIR": str(tmp_path)}
  bench = subprocess.Popen(
      [sys.executable, "-m", "vit_jax.benchmark", "--config=experiments/tiny.py", "--windows=1",
       "--steps_per_window=1", "--nocompile_times", "--peak_matmul_size=512",
       "--time_to_accuracy=0.9999", "--eval_every_steps=4", f"--config.tfds_data_dir={tfds_dir}"],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob("*/run/metrics.jsonl")):  # the timed run trains
      assert bench.poll() is None and time.monotonic() < deadline
      time.sleep(0.5)
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(timeout=60) == 128 + signal.SIGTERM
  finally:
    bench.kill()
  assert bench.stderr.read().strip().splitlines()[-1] == (
      f"interrupted by signal {int(signal.SIGTERM)}; rerun the same command")
  assert list(tmp_path.iterdir()) == []  # the run's temporary folder is gone
  time.sleep(2)  # and so is the run, which would write there again
  assert _processes_naming(tmp_path) == [] and list(tmp_path.iterdir()) == []


def _processes_naming(path) -> list[str]:
  """The command lines of running processes that name `path` (Linux; elsewhere none)."""
  import contextlib
  from pathlib import Path

  found = []
  for proc in Path("/proc").glob("[0-9]*"):
    with contextlib.suppress(OSError):
      if str(path) in (line := (proc / "cmdline").read_bytes().decode(errors="replace")):
        found.append(line)
  return found


def _script(args, **env_vars):
  """Runs a bash script of experiments/ with this test's Python, on one CPU device."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHON=sys.executable, **env_vars)
  return subprocess.run(["bash", *map(str, args)], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


def _accelerator_script(out, **env_vars):
  tiny = dict(CONFIG="experiments/tiny.py", BATCHES="32", WINDOWS="1", TTA_CONFIG="")
  return _script(["experiments/gpu_benchmark.sh", out], **{**tiny, **env_vars})


@pytest.mark.slow
def test_the_accelerator_script_runs_here_too_and_reports_what_failed(tmp_path):
  # experiments/gpu_benchmark.sh is what a session with a lent GPU runs at once: it must not
  # rot where no GPU is. A measurement that fails must not cost the others (the device time
  # is short). Tiny settings; the time-to-accuracy run is tested above.
  out = tmp_path / "out"
  result = _accelerator_script(out, DTYPES="float64 bfloat16", ALLOW_CPU="1")
  log = (out / "gpu_benchmark.log").read_text()
  assert result.returncode == 1, log[-3000:]
  assert "== FAILED: float64 batch 32" in log and "== done" not in log
  written = json.loads((out / "tiny_bfloat16_b32.json").read_text())
  assert written["batch_size"] == 32 and written["compute_dtype"] == "bfloat16"
  assert 0 < written["train_mfu"] < 1.5
  assert not (out / "tiny_float64_b32.json").exists()


@pytest.mark.slow
def test_the_accelerator_script_times_accuracy_from_a_prepared_dataset_without_tensorflow(
    tmp_path, tfds_dir):
  # A lent GPU machine has no TensorFlow: gpu_prepare.sh exports MNIST's decoded arrays, and
  # the time-to-accuracy run must read them through TFDS alone. Here TensorFlow is hidden, and
  # TFDS's default data dir is empty, so any other way to the data fails.
  prepared = tmp_path / "gpu_tfds"
  made = _script(["experiments/gpu_prepare.sh"], WHEELS="0", TFDS_DATA_DIR=tfds_dir,
                 GPU_TFDS=str(prepared))
  assert made.returncode == 0, made.stderr[-3000:]
  hidden = tmp_path / "no_tensorflow" / "tensorflow"
  hidden.mkdir(parents=True)
  (hidden / "__init__.py").write_text('raise ImportError("no TensorFlow here")\n')
  empty = tmp_path / "empty_tfds"
  empty.mkdir()
  out = tmp_path / "out"
  result = _accelerator_script(
      out, BATCHES="", ALLOW_CPU="1", GPU_TFDS=str(prepared), TFDS_DATA_DIR=str(empty),
      TTA_CONFIG="experiments/tiny.py",
      TTA_FLAGS="--config.train_examples=1024 --config.num_epochs=1",
      PYTHONPATH=os.pathsep.join(filter(None, [str(hidden.parent), os.environ.get("PYTHONPATH")])))
  log = (out / "gpu_benchmark.log").read_text()
  assert result.returncode == 0, log[-3000:]
  assert [p.name for p in out.glob("*.json")] == ["tiny_bfloat16_time_to_accuracy.json"]
  written = json.loads((out / "tiny_bfloat16_time_to_accuracy.json").read_text())
  assert written["compute_dtype"] == "bfloat16"
  # It learned from real digits: one class for every image scores at most 0.1135 (the
  # 1s), images misaligned with their labels about 0.1; seed 0 reaches 0.36 here.
  assert 0.2 < written["final_accuracy"] <= 1
  assert not list(empty.iterdir())


def test_the_accelerator_script_refuses_a_cpu_unless_told(tmp_path):
  result = _accelerator_script(tmp_path / "out", DTYPES="bfloat16")
  assert result.returncode == 1
  assert "JAX sees no GPU or TPU" in result.stdout
  assert not list((tmp_path / "out").glob("*.json"))
