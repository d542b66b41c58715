"""Two sweep processes on one root finish every run exactly once, and one of them reports."""

import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_two_sweep_processes_share_the_runs_of_one_root(tmp_path, tfds_dir):
  command = [sys.executable, str(REPO / "experiments" / "sweep_heads.py"), f"--root={tmp_path}",
             "--heads=1,2,4", "--seeds=2", "--cpu_devices=1", f"--config.tfds_data_dir={tfds_dir}",
             "--config.train_examples=512", "--config.num_epochs=2", "--analysis_images=100"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for _ in range(2)]
  try:
    outputs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], outputs
  assert not any("backend 'tpu'" in out for out in outputs)  # JAX's INFO lines kept off
  names = [f"fused_h{h}_w64_s{s}" for h in (1, 2, 4) for s in (0, 1)]
  for name in names:
    # Exactly once, by one of the two ("fused_h1_w64_s0: training" is no prefix of another).
    assert sum(out.count(f"{name}: training") for out in outputs) == 1, (name, outputs)
    assert (tmp_path / name / "result.json").is_file()
    assert (tmp_path / name / "analysis" / "head_importance.csv").is_file()  # each analyzed
  assert (tmp_path / "summary.md").is_file()
  gathered = (tmp_path / "analysis_head_importance.csv").read_text().splitlines()
  layers = 4  # experiments/sweep_small.py
  assert len(gathered) == 1 + 2 * layers * (1 + 2 + 4)  # every head of every run, a row each
  assert gathered[0].startswith("run,qkv,heads,hidden_size,seed,layer,head,")
  assert any("wrote" in out for out in outputs)


def sweep(*flags, tfds_dir, **popen):
  command = [sys.executable, str(REPO / "experiments" / "sweep_heads.py"), "--cpu_devices=1",
             f"--config.tfds_data_dir={tfds_dir}", *flags]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **popen)


@pytest.mark.parametrize("flag,message", [
    ("--heads=four", "error: --heads=four must be whole numbers, e.g. --heads=1,2,4"),
    ("--qkv=", "error: qkv=[]: a sweep needs at least one"),
    ("--seeds=0", "flag --seeds=0: 0 is not a positive integer"),
    *((f"--qkv=fused,{mode}", f"error: qkv='{mode}': a low rank is written with its rank, "
       "low_rank:R (e.g. low_rank:2), and the other modes without one")
      for mode in ("low_rank", "low_rank:", "low_rank:two", "fused:2")),
    ("--report_only", "error: --report_only: 15 of 15 runs under --root=ROOT are not finished; "
                      "no reports written"),  # a misspelt or empty root, say
    # Flags the sweep would not honour, refused before anything loads.
    ("--config.seed=7", "error: --config.seed is set in every run by the sweep: use --seeds=N"),
    ("--config.model.qkv=separate", "error: --config.model.qkv is set in every run by the "
                                    "sweep: use --qkv"),
    ("--config.model.num_heads=8", "error: --config.model.num_heads is set in every run by the "
                                   "sweep: use --heads"),
    ("--report_only --vmap_seeds --analysis_images=10", "note: --report_only trains and "
     "analyzes nothing; not used: --analysis_images, --vmap_seeds"),  # then 15 of 15 missing
    ("--analyze= --analysis_images=10", "error: --analysis_images is for the runs' analysis, "
                                        "which --analyze= turns off"),
])
def test_a_sweep_with_bad_or_no_runs_is_one_line(tmp_path, tfds_dir, flag, message):
  process = sweep(f"--root={tmp_path}", *flag.split(), tfds_dir=tfds_dir)
  output = process.communicate(timeout=300)[0]
  assert process.returncode in (1, 2) and message.replace("ROOT", str(tmp_path)) in output, output
  assert "Traceback" not in output


@pytest.mark.slow
def test_an_interrupted_sweep_says_so_in_one_line_and_exits_as_the_signal_asks(tmp_path,
                                                                                tfds_dir):
  process = sweep(f"--root={tmp_path}", "--heads=1", "--seeds=1", "--analyze=",
                  "--config.num_epochs=50", tfds_dir=tfds_dir)
  lines = []
  for line in process.stdout:  # training has begun (and its signal handler is set)
    lines.append(line)
    if line.startswith("step "):
      break
  process.send_signal(signal.SIGTERM)
  lines += process.communicate(timeout=300)[0].splitlines()
  assert process.returncode == 128 + signal.SIGTERM, lines
  assert lines[-1].startswith("interrupted:") and not any("Traceback" in x for x in lines)
  assert (tmp_path / "fused_h1_w64_s0" / "checkpoints").is_dir()  # resumable
