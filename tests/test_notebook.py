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
