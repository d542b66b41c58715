"""Two processes on JAX's distributed runtime (loopback, gloo) against one process."""

import dataclasses
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO

from vit_jax import inference, train
from vit_jax.experiment_config import validate


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def settings(tfds_dir, epochs, parallel) -> dict:
  """What both the two-process and the one-process runs change in experiments/tiny.py."""
  return {"tfds_data_dir": tfds_dir, "train_examples": 1024, "num_epochs": epochs,
          "parallel": parallel, "checkpoint_every_steps": 4, "log_every_steps": 1}


def overrides(tfds_dir, epochs, parallel):
  return [f"--config.{k}={v}" for k, v in settings(tfds_dir, epochs, parallel).items()]


def run_two_processes(workdir, tfds_dir, epochs, parallel, devices_each=4, timeout=240,
                      fault=(), succeed=True):
  """Both processes' (stdouts, stderrs). `fault`: tests/distributed_fault.py's FAULT PROCESS."""
  port = free_port()
  env = {**os.environ,
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}"}
  program = [str(REPO / "tests" / "distributed_fault.py"), *fault] if fault else [
      str(REPO / "launch.py")]
  procs = [subprocess.Popen(
      [sys.executable, *program, "--config=experiments/tiny.py",
       f"--workdir={workdir}", *overrides(tfds_dir, epochs, parallel),
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  try:
    outputs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:  # never leave a process behind, whatever happened
      p.kill()
      p.wait()
  for p, (_, err) in zip(procs, outputs, strict=True):
    assert (p.returncode == 0) == succeed, err[-3000:]
  return [out for out, _ in outputs], [err for _, err in outputs]


def result_line(stdout, process):
  return next(x for x in stdout.splitlines() if x.startswith(f"process {process}: test accuracy"))


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["pmap", "shard"])
def test_two_processes_train_resume_and_match_one_process(tmp_path, tfds_dir, parallel):
  workdir = tmp_path / "two"
  # 1 epoch (8 steps of 128), then the same workdir resumed for a second epoch.
  outs, errs = run_two_processes(workdir, tfds_dir, 1, parallel)
  assert "step 8/8" in errs[0] and "step 8/8" not in errs[1]  # only process 0 logs
  outs, errs = run_two_processes(workdir, tfds_dir, 2, parallel)
  assert f"resuming {workdir} at step 8" in errs[0]
  lines = [result_line(outs[i], i).split(": ", 1)[1] for i in range(2)]
  assert lines[0] == lines[1], lines  # the processes agree
  assert lines[0].endswith("step 16)")

  # One process with all 8 devices, the same global batch, the same two invocations.
  sys.path.insert(0, str(REPO / "experiments"))
  import tiny

  single = tmp_path / "one"
  for epochs in (1, 2):
    config = dataclasses.replace(validate(tiny.get_config()),
                                 **settings(tfds_dir, epochs, parallel))
    result = train.train_and_evaluate(config, single)
  assert float(lines[0].split()[2]) == pytest.approx(result["eval_accuracy"], abs=2e-3)
  one = jax.device_get(inference.restore_state(config, single).params)
  two = jax.device_get(inference.restore_state(config, workdir).params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
                         one, two)
  # The two processes' checkpoint, restored above on one host, also trains on there.
  third = dataclasses.replace(config, num_epochs=3)
  resumed = train.train_and_evaluate(third, workdir)
  assert resumed["step"] == 24 and np.isfinite(resumed["train_loss"])


@pytest.mark.slow
def test_a_checkpoint_one_process_cannot_save_or_read_is_handled_alike_in_both(tmp_path,
                                                                              tfds_dir):
  # Process 0 alone writes the digests, before the save that every process takes part in: a
  # process that failed alone would leave the other waiting in it.
  _, errs = run_two_processes(tmp_path / "a", tfds_dir, 1, "pmap", fault=("digests", "0"),
                              succeed=False)
  for err in errs:
    assert "error: checkpoint at step 4 could not be written (" in err.strip().splitlines()[-1]
  # A checkpoint one process reads wrong is unreadable to both: they go on from the one before.
  workdir = tmp_path / "b"
  run_two_processes(workdir, tfds_dir, 1, "pmap")
  outs, errs = run_two_processes(workdir, tfds_dir, 2, "pmap", fault=("restore:8", "1"))
  assert "checkpoint at step 8 cannot be read (process 1 could not read it)" in errs[0]
  assert f"resuming {workdir} at step 4" in errs[0]
  lines = [result_line(outs[i], i).split(": ", 1)[1] for i in range(2)]
  assert lines[0] == lines[1] and lines[0].endswith("step 16)"), lines
  assert [p.name.split("-")[0] for p in (workdir / "checkpoints_unreadable").iterdir()] == ["8"]
