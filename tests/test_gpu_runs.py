"""experiments/gpu_runs.sh: several training runs at once on one accelerator.

What a session with a lent GPU runs at once, so it must not rot where no GPU is: here it
runs on the CPU (ALLOW_CPU=1), with tiny runs.
"""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _gpu_runs(runs_file, out, **env_vars):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHON=sys.executable, **env_vars)
  return subprocess.run(["bash", "experiments/gpu_runs.sh", str(runs_file), str(out)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_runs_share_the_device_and_come_back_as_one_archive(tmp_path, tfds_dir):
  tiny = (f"--config=experiments/tiny.py --config.tfds_data_dir={tfds_dir} --cpu_devices=1 "
          "--config.train_examples=1024 --config.num_epochs=1")
  runs_file = tmp_path / "runs.txt"
  runs_file.write_text(f"# two seeds\n\nfirst {tiny}\n  second {tiny} --config.seed=1\n")
  out = tmp_path / "out"
  # Stopped at the time limit (here before they train): not a failure; the same command
  # then finishes them.
  result = _gpu_runs(runs_file, out, ALLOW_CPU="1", RUNS_DIR=str(tmp_path / "runs"),
                     LIMIT_S="2")
  log = (out / "gpu_runs.log").read_text()
  assert result.returncode == 0, log[-3000:]
  assert log.count("stopped at the limit (2 s); the same command resumes it") == 2
  result = _gpu_runs(runs_file, out, ALLOW_CPU="1", RUNS_DIR=str(tmp_path / "runs"))
  log = (out / "gpu_runs.log").read_text()
  assert result.returncode == 0, log[-3000:]
  assert "== first: exit 0" in log and "== second: exit 0" in log
  assert log.count("test accuracy") >= 2  # each run's last evaluation is in the summary
  with tarfile.open(out / "runs.tgz") as archive:
    names = set(archive.getnames())
    seeds = [json.load(archive.extractfile(f"{name}/config.json"))["seed"]
             for name in ("first", "second")]
  assert {"first.log", "first/metrics.jsonl", "second.log", "second/metrics.jsonl"} <= names
  assert seeds == [0, 1]
  assert not any("checkpoints" in name for name in names)


def test_it_refuses_a_cpu_unless_told_and_a_file_without_runs(tmp_path):
  runs_file = tmp_path / "runs.txt"
  runs_file.write_text("first --config=experiments/tiny.py\n")
  result = _gpu_runs(runs_file, tmp_path / "out", RUNS_DIR=str(tmp_path / "runs"))
  assert result.returncode == 1 and "JAX sees no GPU or TPU" in result.stdout
  assert not (tmp_path / "runs" / "first.log").exists()
  runs_file.write_text("# nothing but comments\n\n")
  result = _gpu_runs(runs_file, tmp_path / "out", ALLOW_CPU="1")
  assert result.returncode == 1 and "names no run" in result.stdout
  for lines in ("--config=experiments/tiny.py\n", "a/b --config=experiments/tiny.py\n",
                "twice --config=x\ntwice --config=y\n"):
    runs_file.write_text(lines)
    result = _gpu_runs(runs_file, tmp_path / "out", ALLOW_CPU="1",
                       RUNS_DIR=str(tmp_path / "runs"))
    assert result.returncode == 1 and "not letters, digits" in result.stdout, lines
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())
  result = subprocess.run(["bash", "experiments/gpu_runs.sh"], cwd=REPO, capture_output=True,
                          text=True)
  assert result.returncode == 2 and "usage:" in result.stderr
