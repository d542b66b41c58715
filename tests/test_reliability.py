"""Killed, signalled, corrupted, shared: a run survives and says what happened."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from vit_jax import inference, train
from vit_jax.experiment_config import ExperimentConfig
from vit_jax.locks import WorkdirLock
from vit_jax.metrics import read_metrics
from vit_jax.model_configs import get_model_config

DRIVER = Path(__file__).resolve().parent / "train_driver.py"
TOTAL_STEPS = 64


def driver_config(tfds_dir: str) -> ExperimentConfig:
  """64 steps of the `testing` ViT with dropout: checkpoints every 4, keep 3."""
  return ExperimentConfig(
      model=get_model_config("testing", dropout_rate=0.1), tfds_data_dir=tfds_dir,
      idx_dir=None, train_examples=2048, batch_size=64, num_epochs=2, learning_rate=3e-3,
      warmup_steps=4, log_every_steps=2, checkpoint_every_steps=4, keep_checkpoints=3,
      eval_batch_size=1000, parallel="jit")


def start_driver(workdir, tfds_dir, *extra):
  return subprocess.Popen([sys.executable, str(DRIVER), str(workdir), tfds_dir, *extra],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_steps(workdir) -> int:
  path = Path(workdir) / "metrics.jsonl"
  return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for_progress(proc, workdir, lines, timeout=120):
  deadline = time.monotonic() + timeout
  while logged_steps(workdir) < lines:
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    assert time.monotonic() < deadline, "the run made no progress"
    time.sleep(0.01)


def final_params(tfds_dir, workdir):
  state = inference.restore_state(driver_config(tfds_dir), workdir)
  assert int(state.step) == TOTAL_STEPS
  return jax.device_get(state.params)


def assert_bit_identical(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def reference(tfds_dir, tmp_path_factory):
  """The parameters of an uninterrupted run (in a process of its own, like the others)."""
  workdir = tmp_path_factory.mktemp("reference")
  proc = start_driver(workdir, tfds_dir, "--step-delay=0")
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  return final_params(tfds_dir, workdir)


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bit_identical(tfds_dir, reference, tmp_path):
  workdir = tmp_path / "run"
  # 1. Killed in the middle of writing the checkpoint of step 12.
  proc = start_driver(workdir, tfds_dir, "--die-while-saving=12")
  proc.communicate(timeout=300)
  assert proc.returncode == -signal.SIGKILL
  assert (workdir / "checkpoints" / "12.orbax-checkpoint-tmp").exists()  # half-written
  assert not (workdir / "checkpoints" / "12").exists()
  # 2. Killed at seeded random points of the run (counted in logged metric lines).
  rng = np.random.default_rng(20261129)
  for _ in range(3):
    proc = start_driver(workdir, tfds_dir)
    wait_for_progress(proc, workdir, logged_steps(workdir) + int(rng.integers(1, 8)))
    time.sleep(float(rng.uniform(0, 0.05)))
    proc.kill()
    proc.communicate()
  # 3. Killed while reading the latest checkpoint back.
  proc = start_driver(workdir, tfds_dir, "--die-while-restoring")
  proc.communicate(timeout=300)
  assert proc.returncode == -signal.SIGKILL
  # 4. The same command once more finishes the run.
  proc = start_driver(workdir, tfds_dir)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert f"finished at step {TOTAL_STEPS}" in out
  assert "resuming" in err
  assert_bit_identical(final_params(tfds_dir, workdir), reference)
  # Steps logged after a checkpoint and taken again on resume are logged once, in order.
  logged = [r["step"] for r in read_metrics(workdir) if "train_loss" in r]
  assert logged == list(range(2, TOTAL_STEPS + 1, 2))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_then_resume_is_bit_identical(tfds_dir, reference, tmp_path):
  workdir = tmp_path / "run"
  proc = start_driver(workdir, tfds_dir)
  wait_for_progress(proc, workdir, 3)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode != 0
  line = next(x for x in err.splitlines() if "stopped by signal 15 at step" in x)
  step = int(line.split("at step ")[1].split(";")[0])
  assert 0 < step < TOTAL_STEPS
  assert (workdir / "checkpoints" / str(step)).is_dir()  # saved although not a multiple of 4
  proc = start_driver(workdir, tfds_dir)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert f"resuming {workdir} at step {step}" in err
  assert_bit_identical(final_params(tfds_dir, workdir), reference)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_is_reported_and_skipped(tfds_dir, reference, tmp_path,
                                                           caplog):
  workdir = tmp_path / "run"
  proc = start_driver(workdir, tfds_dir, "--step-delay=0")
  assert proc.wait(timeout=300) == 0
  latest = workdir / "checkpoints" / str(TOTAL_STEPS)
  for f in latest.rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncate every file
  state = inference.restore_state(driver_config(tfds_dir), workdir)
  assert int(state.step) == TOTAL_STEPS - 4
  assert f"checkpoint at step {TOTAL_STEPS} cannot be read" in caplog.text
  assert latest.exists()  # evaluation writes nothing, moves nothing
  # Training again moves it aside and redoes the last 4 steps, to the same parameters.
  result = train.train_and_evaluate(driver_config(tfds_dir), workdir)
  assert list((workdir / "checkpoints_unreadable").iterdir())
  assert result["step"] == TOTAL_STEPS
  assert_bit_identical(final_params(tfds_dir, workdir), reference)


def test_second_run_on_a_busy_workdir_is_refused(tmp_path):
  with WorkdirLock(tmp_path), pytest.raises(ValueError, match=f"is in use by pid {os.getpid()}"):
    train.train_and_evaluate(driver_config("unused"), tmp_path)


def test_a_run_whose_console_reader_leaves_checkpoints_and_stops_like_a_signal(tmp_path,
                                                                              tfds_dir):
  # `launch.py ... | head -5`: without a reader the run cannot report, and must not lose
  # what it trained since its last checkpoint.
  repo = Path(__file__).resolve().parent.parent
  proc = subprocess.Popen(
      [sys.executable, str(repo / "launch.py"), "--config=experiments/tiny.py",
       f"--workdir={tmp_path / 'run'}", f"--config.tfds_data_dir={tfds_dir}",
       "--config.log_every_steps=4", "--cpu_devices=1"],
      cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    for _ in range(5):
      proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(timeout=300) == 128 + signal.SIGPIPE
  finally:
    proc.kill()
  saved = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()]
  assert saved == [read_metrics(tmp_path / "run")[-1]["step"]] and saved[0] < 512


def test_lock_of_a_killed_process_does_not_stick(tmp_path):
  code = ("import sys, time; from pathlib import Path; from vit_jax.locks import "
          "WorkdirLock; lock = WorkdirLock(Path(sys.argv[1])).__enter__(); "
          "print('locked', flush=True); time.sleep(60)")
  proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                          text=True)
  try:
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(ValueError, match="is in use by pid"), WorkdirLock(tmp_path):
      pass
  finally:
    proc.kill()
    proc.wait()
    proc.stdout.close()
  with WorkdirLock(tmp_path):  # the kernel released the dead process's lock
    pass


@pytest.mark.slow
def test_sigkill_while_a_damaged_checkpoint_is_set_aside_then_resume_is_bit_identical(
    tfds_dir, reference, tmp_path):
  workdir = tmp_path / "run"
  proc = start_driver(workdir, tfds_dir, "--step-delay=0")
  assert proc.wait(timeout=300) == 0
  data = max((p for p in (workdir / "checkpoints" / str(TOTAL_STEPS)).rglob("*")
              if p.is_file() and "/d/" in str(p)), key=lambda p: p.stat().st_size)
  damaged = bytearray(data.read_bytes())
  damaged[len(damaged) // 2] ^= 0xFF  # one flipped byte in an array's data
  data.write_bytes(bytes(damaged))
  proc = start_driver(workdir, tfds_dir, "--die-while-moving-aside")
  proc.communicate(timeout=300)
  assert proc.returncode == -signal.SIGKILL
  assert not (workdir / "checkpoints" / str(TOTAL_STEPS)).exists()  # moved; digests not yet
  proc = start_driver(workdir, tfds_dir)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert f"resuming {workdir} at step {TOTAL_STEPS - 4}" in err
  assert_bit_identical(final_params(tfds_dir, workdir), reference)


def test_a_workdir_saved_before_newer_config_fields_still_resumes(tmp_path):
  from vit_jax.workdir import write_or_check_config

  config = driver_config("unused")
  write_or_check_config(tmp_path, config)
  saved = json.loads((tmp_path / "config.json").read_text())
  del saved["validation_examples"], saved["model"]["drop_path_rate"]  # as an older version
  (tmp_path / "config.json").write_text(json.dumps(saved))
  write_or_check_config(tmp_path, config)  # their defaults are what that run had
  with pytest.raises(ValueError, match="model.drop_path_rate: 0.0 -> 0.1"):
    write_or_check_config(tmp_path, dataclasses.replace(
        config, model=dataclasses.replace(config.model, num_layers=2, drop_path_rate=0.1)))


def test_a_log_that_cannot_be_flushed_at_the_end_is_no_second_error(tmp_path):
  import errno
  import logging

  from vit_jax import run_log

  class FullDisk:
    def write(self, text):
      pass

    def flush(self):
      raise OSError(errno.ENOSPC, "No space left on device")

    close = flush

  with run_log.logging_to(tmp_path):
    logging.getLogger("vit_jax.test").warning("buffered when the disk fills")
    handler = next(h for h in logging.getLogger().handlers
                   if getattr(h, "baseFilename", "").endswith("run.log"))
    handler.stream.close()  # the disk fills after this write reached it
    handler.stream = FullDisk()
  assert handler.stream is None  # closed without raising
