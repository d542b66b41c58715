"""The walkthrough notebook runs top to bottom, and the shipped model is what it says."""

import json

import nbformat
import pytest
from conftest import REPO

from vit_jax import inference

SHIPPED = REPO / "pretrained" / "mnist_seed"


@pytest.mark.slow
def test_the_walkthrough_notebook_runs_top_to_bottom(mnist):
  import jupytext
  from nbclient import NotebookClient

  notebook = jupytext.read(REPO / "notebooks" / "walkthrough.py")
  assert sum(cell.cell_type == "code" for cell in notebook.cells) >= 10
  NotebookClient(notebook, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
  printed = "".join(output.get("text", "") for cell in notebook.cells
                    for output in cell.get("outputs", []))
  for shape in ("qkv (1, 50, 192)", "per head (1, 4, 50, 16)", "merged (1, 50, 64)",
                "attention weights (1, 4, 50, 50)", "rows sum to 1: True"):
    assert shape in printed
  assert not [o for cell in notebook.cells for o in cell.get("outputs", [])
              if o.output_type == "error"]
  nbformat.validate(notebook)


@pytest.mark.slow
def test_the_shipped_model_scores_the_test_accuracy_recorded_beside_it(mnist):
  final = [json.loads(line) for line in (SHIPPED / "metrics.jsonl").read_text().splitlines()]
  recorded = [r["eval_accuracy"] for r in final if "eval_accuracy" in r][-1]
  assert f"{100 * recorded:.2f} %" in (SHIPPED / "README.md").read_text()
  measured = inference.evaluate_checkpoint(json.loads((SHIPPED / "config.json").read_text()),
                                           SHIPPED)
  assert measured["eval_accuracy"] == pytest.approx(recorded, abs=1e-4)
  assert recorded >= 0.99


@pytest.mark.slow
def test_pictures_of_the_shipped_model_go_under_runs_not_into_it(tmp_path, mnist):
  import shutil
  import subprocess
  import sys

  shipped = tmp_path / "pretrained" / "mnist_seed"
  shutil.copytree(SHIPPED, shipped)
  before = {p: p.stat().st_mtime_ns for p in shipped.rglob("*")}
  result = subprocess.run([sys.executable, str(REPO / "launch.py"), f"--workdir={shipped}",
                           f"--config={REPO / 'experiments' / 'mnist.py'}",
                           "--mode=visualize", "--num_images=1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / "runs" / "mnist_seed" / "visualize" / "attention_0.png").is_file()
  # Training it further (--mode forgotten) is refused before anything is written there.
  result = subprocess.run([sys.executable, str(REPO / "launch.py"), f"--workdir={shipped}",
                           f"--config={REPO / 'experiments' / 'mnist.py'}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(
      f"error: workdir='{shipped}' is a shipped run (its SHIPPED file says so)")
  assert {p: p.stat().st_mtime_ns for p in shipped.rglob("*")} == before
