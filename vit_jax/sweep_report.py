"""A sweep's records as tables: runs.csv, summary.csv, summary.md, paired_differences.csv
(each mode against `fused`, seed by seed), the runs' analyses gathered into one CSV per
instrument (analysis_*.csv) and averaged by head count (analysis_by_heads.csv); and the
pictures of them that `sweep_plots` draws.

Layer 5 of vit_jax, beside `visualize.py`: it reads the records `vit_jax.sweep` writes.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from vit_jax import analyze, sweep_plots
from vit_jax.files import write_csv_atomically, write_text_atomically

ANALYSIS_FILES = ("head_importance.csv", "head_importance_mean.csv", "pruning_curve.csv",
                  "pruning_curve_mean.csv", "attention_statistics.csv",
                  "projection_spectra.csv", "head_redundancy.csv")

SUMMARY_COLUMNS = ["qkv", "heads", "hidden_size", "head_dim", "params", "seeds",
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
        "qkv": qkv, "heads": heads, "hidden_size": width, "head_dim": width // heads,
        "params": group[0]["params"], "seeds": len(group),
        "accuracy_mean": float(acc.mean()),
        "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else float("nan"),  # unknown
        "entropy_mean": float(np.mean([r["attention_entropy"] for r in group])),
        "images_per_sec": float(np.mean([r["images_per_sec"] for r in group])),
        "wall_seconds": float(np.mean([r["wall_seconds"] for r in group])),
    })
  return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
  header = ("| Q/K/V | heads | width | head dim | parameters | seeds | test accuracy "
            "(mean ± std) | attention entropy (nats) | images/s | wall time (s) |")
  lines = [header, "|" + " --- |" * 10]
  for r in rows:
    spread = "" if math.isnan(r["accuracy_std"]) else f" ± {100 * r['accuracy_std']:.2f}"
    lines.append(
        f"| {r['qkv']} | {r['heads']} | {r['hidden_size']} | {r['head_dim']} | "
        f"{r['params']:,} | {r['seeds']} | {100 * r['accuracy_mean']:.2f}{spread} % | "
        f"{r['entropy_mean']:.3f} | {r['images_per_sec']:.0f} | {r['wall_seconds']:.0f} |")
  return "\n".join(lines) + "\n"


def paired_differences(records: list[dict[str, Any]], baseline: str = "fused"
                       ) -> list[dict[str, Any]]:
  """Per (qkv, heads, width) other than `baseline`: its test accuracy minus the baseline's
  at the same heads, width and seed, averaged over the seeds both have, with a 95 %
  t-interval (none from a single seed)."""
  accuracy = {(r["qkv"], r["heads"], r["hidden_size"], r["seed"]): r["eval_accuracy"]
              for r in records}
  groups: dict[tuple, list[float]] = {}
  for (qkv, heads, width, seed), acc in accuracy.items():
    base = accuracy.get((baseline, heads, width, seed))
    if qkv != baseline and base is not None:
      groups.setdefault((qkv, heads, width), []).append(acc - base)
  rows = []
  for (qkv, heads, width), diffs in sorted(groups.items()):
    d = np.array(diffs)
    half = (stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
            if len(d) > 1 else float("nan"))
    rows.append({"qkv": qkv, "baseline": baseline, "heads": heads, "hidden_size": width,
                 "seeds": len(d), "difference_mean": float(d.mean()),
                 "ci95_low": float(d.mean() - half), "ci95_high": float(d.mean() + half)})
  return rows


def collect_analyses(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
  """Each instrument's CSV from every run's analysis/ (`launch.py --mode=analyze`), one
  table per instrument with the run's name, mode, heads, width and seed in front."""
  paths = []
  for name in ANALYSIS_FILES:
    header, rows = None, []
    for r in records:
      path = out_dir / r["name"] / "analysis" / name
      if path.is_file() and _analysis_finished(path.parent, name):
        with path.open(newline="") as f:
          header, *body = list(csv.reader(f))
        rows += [[r["name"], r["qkv"], r["heads"], r["hidden_size"], r["seed"], *row]
                 for row in body]
    if header is not None:
      paths.append(write_csv_atomically(out_dir / f"analysis_{name}",
                                        ["run", "qkv", "heads", "hidden_size", "seed", *header],
                                        rows))
  return paths


def _analysis_finished(folder: Path, name: str) -> bool:
  """Whether the analysis that writes `name` finished (an interrupted one, or one another
  process is still writing, is left out): the ablation's own marker, or either's for the
  files every analysis writes first."""
  if name in ("head_importance.csv", "pruning_curve.csv"):
    ablations = ("zero",)
  elif name.endswith("_mean.csv"):
    ablations = ("mean",)
  else:
    ablations = ("zero", "mean")
  return any(analyze.done_marker(folder, a).is_file() for a in ablations)


def write_reports(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
  """runs.csv, summary.csv, summary.md, sweep.png and paired_differences.csv in `out_dir`,
  and the runs' analyses gathered (`collect_analyses`)."""
  out_dir.mkdir(parents=True, exist_ok=True)
  rows = summarize(records)
  paths = [out_dir / "runs.csv", out_dir / "summary.csv", out_dir / "summary.md",
           out_dir / "sweep.png", out_dir / "paired_differences.csv"]
  columns = list(dict.fromkeys(k for r in records for k in r if k != "config"))  # old and new
  _write_csv(paths[0], [{k: v for k, v in r.items() if k != "config"} for r in records],
             columns)
  _write_csv(paths[1], rows, SUMMARY_COLUMNS)
  differences = paired_differences(records)
  write_text_atomically(paths[2], markdown_table(rows) + differences_table(differences))
  sweep_plots.plot(rows, paths[3])
  _write_csv(paths[4], differences, ["qkv", "baseline", "heads", "hidden_size", "seeds",
                                     "difference_mean", "ci95_low", "ci95_high"])
  gathered = collect_analyses(records, out_dir)
  if gathered:
    means = analysis_by_heads(out_dir)
    gathered.append(out_dir / "analysis_by_heads.csv")
    _write_csv(gathered[-1], [{"qkv": qkv, "heads": h, **values} for qkv, by_heads in
                              sorted(means.items()) for h, values in sorted(by_heads.items())],
               ["qkv", "heads", *BY_HEADS_COLUMNS])
    gathered.append(sweep_plots.plot_analyses(means, out_dir / "analysis_by_heads.png"))
    for qkv in sorted({r["qkv"] for r in records}):
      if models := models_by_heads(out_dir, qkv):
        gathered.append(sweep_plots.plot_models(models, qkv,
                                                out_dir / f"analysis_models_{qkv}.png"))
  for stale in set(out_dir.glob("analysis_*")) - set(gathered):  # an earlier report's; after,
    if stale.is_file():  # not before: a second process reporting at once writes the same
      stale.unlink()
  return paths + gathered


def differences_table(rows: list[dict[str, Any]]) -> str:
  """`paired_differences` as markdown, in percentage points ('-' for no interval)."""
  if not rows:
    return ""
  lines = ["", "| Q/K/V | minus | heads | width | seeds | accuracy difference "
           "(percentage points) | 95 % interval |", "|" + " --- |" * 7]
  for r in rows:
    lines.append(f"| {r['qkv']} | {r['baseline']} | {r['heads']} | {r['hidden_size']} | "
                 f"{r['seeds']} | {100 * r['difference_mean']:+.2f} | "
                 + ("- |" if np.isnan(r["ci95_low"]) else
                    f"[{100 * r['ci95_low']:+.2f}, {100 * r['ci95_high']:+.2f}] |"))
  return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
  """`rows` as a table of `columns` ('' where a row lacks one); two processes may report at
  once, so whole or not at all."""
  write_csv_atomically(path, columns, [[r.get(c, "") for c in columns] for r in rows])



BY_HEADS_COLUMNS = ["accuracy_drop", "accuracy_drop_mean_ablation", "qk_rank_share",
                    "distance_first_layer", "distance_last_layer", "js_divergence"]


def analysis_by_heads(out_dir: Path) -> dict[str, dict[int, dict[str, float]]]:
  """From the gathered analyses, per mode and head count, means over layers, heads and seeds
  of: the accuracy lost when one head is removed alone (zeroed; mean-ablated), the effective
  rank of the heads' W_QK as a share of the head dim (its largest possible rank), the mean
  attention distance in pixels in the first and the last layer, and the Jensen-Shannon
  divergence between two different heads of a layer."""
  out: dict[str, dict[int, dict[str, list[float]]]] = {}

  def add(row, key, value):
    out.setdefault(row["qkv"], {}).setdefault(int(row["heads"]), {}).setdefault(
        key, []).append(value)

  def rows(name):
    return _read_rows(out_dir / f"analysis_{name}.csv")

  for row in rows("head_importance"):
    add(row, "accuracy_drop", float(row["accuracy_drop"]))
  for row in rows("head_importance_mean"):
    add(row, "accuracy_drop_mean_ablation", float(row["accuracy_drop"]))
  for row in rows("projection_spectra"):
    if row["matrix"] == "W_QK":
      head_dim = int(row["hidden_size"]) // int(row["heads"])
      add(row, "qk_rank_share", float(row["effective_rank"]) / head_dim)
  statistics = rows("attention_statistics")
  last = max((int(row["layer"]) for row in statistics), default=0)
  for row in statistics:  # a one-layer model's only layer is both
    for key, layer in (("distance_first_layer", 0), ("distance_last_layer", last)):
      if int(row["layer"]) == layer:
        add(row, key, float(row["mean_distance_pixels"]))
  for row in rows("head_redundancy"):
    if int(row["head_a"]) < int(row["head_b"]):
      add(row, "js_divergence", float(row["js_divergence"]))
  return {qkv: {h: {k: float(np.mean(v)) for k, v in d.items()} for h, d in by_heads.items()}
          for qkv, by_heads in out.items()}


def _read_rows(path: Path) -> list[dict[str, str]]:
  if not path.is_file():
    return []
  with path.open(newline="") as f:
    return list(csv.DictReader(f))



def models_by_heads(out_dir: Path, qkv: str, seed: int = 0) -> dict[int, dict[str, Any]]:
  """One model per head count (mode `qkv`, seed `seed`), from the gathered analyses: its
  accuracy lost with each head removed alone, (layers, heads), and each head's singular
  values of W_QK as {(layer, head): values}."""
  models: dict[int, dict[str, Any]] = {}
  mine = lambda row: row["qkv"] == qkv and int(row["seed"]) == seed  # noqa: E731
  for row in filter(mine, _read_rows(out_dir / "analysis_head_importance.csv")):
    drops = models.setdefault(int(row["heads"]), {"drops": {}, "qk_spectra": {}})["drops"]
    drops[int(row["layer"]), int(row["head"])] = float(row["accuracy_drop"])
  for row in filter(mine, _read_rows(out_dir / "analysis_projection_spectra.csv")):
    if row["matrix"] == "W_QK" and int(row["heads"]) in models:
      models[int(row["heads"])]["qk_spectra"][int(row["layer"]), int(row["head"])] = [
          float(v) for v in row["singular_values"].split()]
  for model in models.values():
    layers, heads = (1 + max(i for i, _ in model["drops"]), 1 + max(h for _, h in model["drops"]))
    grid = np.full((layers, heads), np.nan)
    for (layer, head), drop in model["drops"].items():
      grid[layer, head] = drop
    model["drops"] = grid
  return models
