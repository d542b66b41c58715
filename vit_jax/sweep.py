"""Sweeps over head counts (and the Q/K/V projection ablation), through `train_and_evaluate`.

Each run has its own workdir under the sweep's root. A finished run leaves
`result.json` there and is skipped when the sweep is run again; an unfinished one
resumes from its checkpoint, since training always does. At the end the sweep
writes runs.csv (one row a run), summary.csv and summary.md (mean and std over
seeds) and sweep.png.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vit_jax import analysis, mnist_source, train
from vit_jax.experiment_config import ExperimentConfig
from vit_jax.metrics import read_metrics
from vit_jax.model_configs import ModelConfig
from vit_jax.models import count_params
from vit_jax.schema import from_mapping

RESULT_FILE = "result.json"
ENTROPY_IMAGES = 1000  # test images whose attention entropy is averaged


@dataclasses.dataclass(frozen=True)
class Run:
  heads: int
  hidden_size: int
  qkv: str
  seed: int

  @property
  def name(self) -> str:
    return f"{self.qkv}_h{self.heads}_w{self.hidden_size}_s{self.seed}"


def plan(base: ExperimentConfig, heads: Sequence[int], seeds: Sequence[int],
         qkv_modes: Sequence[str] = ("fused",), fixed: str = "width"
         ) -> list[tuple[Run, ExperimentConfig]]:
  """Every (qkv, heads, seed) run with its config.

  fixed='width' keeps the base width (head size = width / heads, as in the design);
  fixed='head_size' keeps the base head size (width = heads * head size).
  """
  if fixed not in ("width", "head_size"):
    raise ValueError(f"fixed={fixed!r} is not one of 'width', 'head_size'")
  runs = []
  for qkv in qkv_modes:
    for h in heads:
      width = base.model.hidden_size if fixed == "width" else h * base.model.head_dim
      model_fields = {**dataclasses.asdict(base.model), "num_heads": h, "hidden_size": width,
                      "qkv": qkv}
      model = from_mapping(ModelConfig, model_fields, path="model")  # validates the combination
      for seed in seeds:
        runs.append((Run(h, width, qkv, seed), dataclasses.replace(base, model=model, seed=seed)))
  return runs


def run_one(run: Run, config: ExperimentConfig, workdir: Path, data: dict) -> dict[str, Any]:
  """Trains (or resumes) one run, measures it, and writes its result.json."""
  resumed = (workdir / "checkpoints").is_dir()
  start = time.monotonic()
  final = train.train_and_evaluate(config, workdir, data=data)
  wall = time.monotonic() - start
  state = train.restore_state(config, workdir)
  spec = mnist_source.dataset_spec(config.dataset)
  _, maps = analysis.collect_attention(state, data["test"]["image"][:ENTROPY_IMAGES],
                                       spec.mean, spec.std)
  speeds = [r["images_per_sec"] for r in read_metrics(workdir) if "images_per_sec" in r]
  record = {
      **dataclasses.asdict(run), "name": run.name,
      "params": count_params(state.params),
      "eval_accuracy": final["eval_accuracy"], "eval_loss": final["eval_loss"],
      # The first window includes compilation: the median of the rest is the speed.
      "images_per_sec": float(np.median(speeds[1:] if len(speeds) > 1 else speeds)),
      "wall_seconds": wall, "resumed": resumed,
      "attention_entropy": analysis.attention_entropy(maps),
      "config": _as_json(config),
  }
  tmp = workdir / (RESULT_FILE + ".tmp")
  tmp.write_text(json.dumps(record, indent=2) + "\n")
  tmp.replace(workdir / RESULT_FILE)
  return record


def _as_json(config: ExperimentConfig) -> dict[str, Any]:
  return json.loads(json.dumps(dataclasses.asdict(config)))


def run_all(runs: list[tuple[Run, ExperimentConfig]], root: Path, data: dict,
            say: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Runs what is not finished, skips what is; returns every run's record."""
  records = []
  for i, (run, config) in enumerate(runs, 1):
    workdir = Path(root) / run.name
    result = workdir / RESULT_FILE
    if result.is_file():
      record = json.loads(result.read_text())
      changed = sorted(k for k, v in _as_json(config).items() if record["config"].get(k) != v)
      if changed:
        raise ValueError(f"{workdir} finished with a different {', '.join(changed)}; "
                         "use another --root for another config")
      say(f"[{i}/{len(runs)}] {run.name}: finished before, skipped")
      records.append(record)
      continue
    say(f"[{i}/{len(runs)}] {run.name}: "
        f"{'resuming' if (workdir / 'checkpoints').is_dir() else 'training'}")
    record = run_one(run, config, workdir, data)
    say(f"[{i}/{len(runs)}] {run.name}: test accuracy {record['eval_accuracy']:.4f}")
    records.append(record)
  return records


SUMMARY_COLUMNS = ["qkv", "heads", "hidden_size", "head_size", "params", "seeds",
                   "accuracy_mean", "accuracy_std", "entropy_mean", "images_per_sec",
                   "wall_seconds"]


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean and sample std over seeds, a row per (qkv, heads, width)."""
  groups: dict[tuple, list[dict]] = {}
  for r in records:
    groups.setdefault((r["qkv"], r["heads"], r["hidden_size"]), []).append(r)
  rows = []
  for (qkv, heads, width), group in sorted(groups.items()):
    acc = np.array([r["eval_accuracy"] for r in group])
    rows.append({
        "qkv": qkv, "heads": heads, "hidden_size": width, "head_size": width // heads,
        "params": group[0]["params"], "seeds": len(group),
        "accuracy_mean": float(acc.mean()),
        "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
        "entropy_mean": float(np.mean([r["attention_entropy"] for r in group])),
        "images_per_sec": float(np.mean([r["images_per_sec"] for r in group])),
        "wall_seconds": float(np.mean([r["wall_seconds"] for r in group])),
    })
  return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
  header = ("| Q/K/V | heads | width | head size | parameters | seeds | test accuracy "
            "(mean ± std) | attention entropy (nats) | images/s | wall time (s) |")
  lines = [header, "|" + " --- |" * 10]
  for r in rows:
    lines.append(
        f"| {r['qkv']} | {r['heads']} | {r['hidden_size']} | {r['head_size']} | "
        f"{r['params']:,} | {r['seeds']} | {100 * r['accuracy_mean']:.2f} ± "
        f"{100 * r['accuracy_std']:.2f} % | {r['entropy_mean']:.3f} | "
        f"{r['images_per_sec']:.0f} | {r['wall_seconds']:.0f} |")
  return "\n".join(lines) + "\n"


def write_reports(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
  """runs.csv, summary.csv, summary.md and sweep.png in `out_dir`."""
  out_dir.mkdir(parents=True, exist_ok=True)
  rows = summarize(records)
  paths = [out_dir / "runs.csv", out_dir / "summary.csv", out_dir / "summary.md",
           out_dir / "sweep.png"]
  _write_csv(paths[0], [{k: v for k, v in r.items() if k != "config"} for r in records],
             [k for k in records[0] if k != "config"])
  _write_csv(paths[1], rows, SUMMARY_COLUMNS)
  paths[2].write_text(markdown_table(rows))
  plot(rows, paths[3])
  return paths


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
  """Test accuracy (error bars: std over seeds) and attention entropy against heads."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (acc_ax, ent_ax) = plt.subplots(1, 2, figsize=(9, 3.6))
  for qkv in sorted({r["qkv"] for r in rows}):
    mine = sorted((r for r in rows if r["qkv"] == qkv), key=lambda r: r["heads"])
    heads = [r["heads"] for r in mine]
    label = {"fused": "learned Q/K/V", "separate": "learned W_Q, W_K, W_V",
             "identity": "identity (no projection)"}.get(qkv, qkv)
    acc_ax.errorbar(heads, [100 * r["accuracy_mean"] for r in mine],
                    yerr=[100 * r["accuracy_std"] for r in mine], marker="o", capsize=3,
                    label=label)
    ent_ax.plot(heads, [r["entropy_mean"] for r in mine], marker="o", label=label)
  for ax, ylabel in ((acc_ax, "test accuracy (%)"), (ent_ax, "mean attention entropy (nats)")):
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["heads"] for r in rows}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("heads")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  acc_ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
