"""Every command's refusals of bad flags, in subprocesses: one line, exit status 2, no
traceback, and nothing written."""

import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.parametrize("command", [["launch.py", "--workdir=ROOT/run"],
                                     ["experiments/sweep_heads.py", "--root=ROOT"],
                                     ["-m", "vit_jax.benchmark", "--out=ROOT/b.json"],
                                     ["-m", "vit_jax.benchmark.scaling", "--out=ROOT/s.json"]],
                         ids=["launch", "sweep_heads", "benchmark", "scaling"])
@pytest.mark.parametrize("flag,line", [
    ("--config.model.nmu_heads=4", "error: config.model.nmu_heads is not a known key of the "
     "config"),
    # get_config() raising (ml_collections would put its traceback in absl's message).
    ("--config=experiments/mnist_best.py:", "error: --config=experiments/mnist_best.py: cannot "
     "be loaded: ValueError: teachers='' (after 'mnist_best.py:') names no file"),
    ("--config=experiments/tiny.py:x", "error: --config=experiments/tiny.py:x cannot be "
     "loaded: TypeError: get_config() takes 0 positional arguments but 1 was given"),
], ids=["misspelt_key", "config_raises", "config_takes_no_argument"])
def test_every_command_says_a_bad_config_in_one_line(command, flag, line, tmp_path):
  args = [a.replace("ROOT", str(tmp_path)) for a in command]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, *args, flag], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith(line), result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not list(tmp_path.iterdir())  # no run folder, no results file


@pytest.mark.parametrize("command,line", [
    (["launch.py", "--workdir="], "error: --workdir='' names no folder"),
    (["launch.py", "--workdir=run", "--mode=predict", "--images=a.png,"],
     "error: --images=a.png, has an empty file name (a stray comma?)"),
    (["launch.py", "--workdir=run", "--compilation_cache_dir=file"],
     "error: --compilation_cache_dir='file' is a file, not a folder"),
    (["launch.py", "--workdir=run", "--mode=visualize", "--output_dir=file"],
     "error: --output_dir='file' is a file, not a folder"),
    (["experiments/sweep_heads.py", "--root="], "error: --root='' names no folder"),
    (["experiments/sweep_heads.py", "--root=file"],
     "error: --root='file' is a file, not a folder"),
    (["experiments/sweep_heads.py", "--root=none", "--report_only"],
     "error: --report_only: --root='none' does not exist"),
])
def test_a_flag_naming_no_file_or_folder_is_one_line(command, line, tmp_path):
  # In a folder of its own: an empty name was the current folder, where it trained.
  (tmp_path / "file").write_text("")
  result = subprocess.run([sys.executable, str(REPO / command[0]), *command[1:],
                           f"--config={REPO / 'experiments' / 'tiny.py'}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == line
  assert [p.name for p in tmp_path.iterdir()] == ["file"]  # no run folder either


@pytest.mark.parametrize("module,flag,message", [
    ("vit_jax.benchmark", "--time_to_accuracy=0.98,high",
     "error: --time_to_accuracy=0.98,high must be accuracies, e.g. 0.98,0.99"),
    ("vit_jax.benchmark", "--windows=0", "flag --windows=0: 0 is not a positive integer"),
    ("vit_jax.benchmark", "--time_to_accuracy=98", "error: --time_to_accuracy=98 must be "
     "accuracies in (0, 1], e.g. 0.98,0.99"),
    ("vit_jax.benchmark", "--out=README.md/b.json",
     "error: --out='README.md/b.json': 'README.md' is not a folder"),
    ("vit_jax.benchmark", "--out=", "error: --out='' names no file"),
    ("vit_jax.benchmark.scaling", "--out=docs", "error: --out='docs' names no file"),
    ("vit_jax.benchmark", "--time_to_accuracy=0.9 --eval_every_steps=50 "
     "--config.eval_every_steps=10", "error: --eval_every_steps and --config.eval_every_steps "
     "both set the timed run's evaluation interval: give one"),
    ("vit_jax.benchmark.scaling", "--steps_per_window=0",
     "flag --steps_per_window=0: 0 is not a positive integer"),
])
def test_the_benchmarks_refuse_bad_flags_in_one_line_before_measuring(module, flag, message):
  result = subprocess.run([sys.executable, "-m", module, *flag.split()], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode in (1, 2) and "Traceback" not in result.stderr
  assert message in result.stderr, result.stderr


@pytest.mark.parametrize("flags,told", [
    (["--config.model.num_heads=x"], "flag --config.model.num_heads=x: invalid literal for int()"),
    (["--config.seed=2", "--bogus"], "Unknown command line flag 'bogus'"),
])
def test_other_flag_errors_beside_a_config_are_absls_own(flags, told, tmp_path):
  # Parsed once: a second parse would define the --config.x flags again and tell that instead.
  result = subprocess.run([sys.executable, "launch.py", f"--workdir={tmp_path}/run",
                           "--config=experiments/tiny.py", *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  assert told in result.stderr and "defined twice" not in result.stderr, result.stderr[-2000:]
  assert not list(tmp_path.iterdir())
