"""experiments/ship_model.py: a finished run's latest checkpoint, whole or not at all."""

import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import REPO

from vit_jax.experiment_config import ExperimentConfig
from vit_jax.model_configs import get_model_config


def ship(workdir, to):
  return subprocess.run([sys.executable, str(REPO / "experiments" / "ship_model.py"),
                         f"--workdir={workdir}", f"--to={to}"],
                        capture_output=True, text=True, timeout=120)


def finished_run(folder):
  """A workdir's layout: checkpoints 4 and 8, their digests, config and metrics."""
  for step in (4, 8):
    (folder / "checkpoints" / str(step) / "default").mkdir(parents=True)
    (folder / "checkpoints" / str(step) / "default" / "data").write_text(f"step {step}")
  (folder / "checkpoint_digests").mkdir()
  for step in (4, 8):
    (folder / "checkpoint_digests" / f"{step}.json").write_text(json.dumps({"step": step}))
  # 64 training images in batches of 8: the run ends at step 8.
  (folder / "config.json").write_text(json.dumps(dataclasses.asdict(ExperimentConfig(
      model=get_model_config("testing"), train_examples=64, batch_size=8, num_epochs=1))))
  (folder / "metrics.jsonl").write_text('{"step": 8}\n')
  (folder / "run.log").write_text("not shipped")
  return folder


def test_the_latest_checkpoint_ships_with_its_digests_config_and_metrics(tmp_path):
  run = finished_run(tmp_path / "run")
  result = ship(run, tmp_path / "shipped" / "mnist")
  assert result.returncode == 0, result.stderr[-2000:]
  shipped = tmp_path / "shipped" / "mnist"
  assert sorted(str(p.relative_to(shipped)) for p in shipped.rglob("*") if p.is_file()) == [
      "SHIPPED", "checkpoint_digests/8.json", "checkpoints/8/default/data", "config.json",
      "metrics.jsonl"]
  assert (shipped / "checkpoints" / "8" / "default" / "data").read_text() == "step 8"
  assert [p.name for p in (tmp_path / "shipped").iterdir()] == ["mnist"]  # nothing staged left
  (tmp_path / "file").write_text("")
  for to, why in [(shipped, "exists; ship into a new folder"),
                  (run / "copy", f"is inside --workdir='{run}'; ship beside it"),
                  (tmp_path / "file" / "x", f": '{tmp_path / 'file'}' is a file, not a folder")]:
    result = ship(run, to)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --to='{to}'{'' if why[0] == ':' else ' '}{why}")
  assert not (run / "copy").exists()
  assert ship(run, run / ".." / "beside").returncode == 0  # `..` taken as it resolves


@pytest.mark.parametrize("remove,message", [
    ("checkpoint_digests/8.json", "has no checkpoint_digests/8.json: not a finished run's "
     "folder"),
    ("checkpoints", "holds no checkpoint"),
    ("checkpoints/8", "stopped at step 4 of 8: finish it first (python launch.py --workdir=RUN)"),
])
def test_a_run_that_cannot_ship_is_one_line_and_leaves_nothing(tmp_path, remove, message):
  import shutil

  run = finished_run(tmp_path / "run")
  shutil.rmtree(run / remove) if (run / remove).is_dir() else (run / remove).unlink()
  if remove == "checkpoints/8":  # stopped at step 4
    (run / "checkpoint_digests" / "8.json").unlink()
  result = ship(run, tmp_path / "shipped" / "mnist")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: --workdir='{run}' {message.replace('RUN', str(run))}")
  assert not (tmp_path / "shipped").exists() or not any((tmp_path / "shipped").iterdir())
