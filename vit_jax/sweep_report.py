"""A sweep's records as tables and a plot: runs.csv, summary.csv, summary.md, sweep.png,
paired_differences.csv (each mode against `fused`, seed by seed), and the runs' analyses
gathered into one CSV per instrument (analysis_*.csv).

Layer 5 of vit_jax, beside `visualize.py`: it reads the records `vit_jax.sweep` writes.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

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
        "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
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
    lines.append(
        f"| {r['qkv']} | {r['heads']} | {r['hidden_size']} | {r['head_dim']} | "
        f"{r['params']:,} | {r['seeds']} | {100 * r['accuracy_mean']:.2f} ± "
        f"{100 * r['accuracy_std']:.2f} % | {r['entropy_mean']:.3f} | "
        f"{r['images_per_sec']:.0f} | {r['wall_seconds']:.0f} |")
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
      if path.is_file():
        with path.open(newline="") as f:
          header, *body = list(csv.reader(f))
        rows += [[r["name"], r["qkv"], r["heads"], r["hidden_size"], r["seed"], *row]
                 for row in body]
    if header is not None:
      paths.append(out_dir / f"analysis_{name}")
      with paths[-1].open("w", newline="") as f:
        csv.writer(f).writerows([["run", "qkv", "heads", "hidden_size", "seed", *header],
                                 *rows])
  return paths


def write_reports(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
  """runs.csv, summary.csv, summary.md, sweep.png and paired_differences.csv in `out_dir`,
  and the runs' analyses gathered (`collect_analyses`)."""
  out_dir.mkdir(parents=True, exist_ok=True)
  rows = summarize(records)
  paths = [out_dir / "runs.csv", out_dir / "summary.csv", out_dir / "summary.md",
           out_dir / "sweep.png", out_dir / "paired_differences.csv"]
  _write_csv(paths[0], [{k: v for k, v in r.items() if k != "config"} for r in records],
             [k for k in records[0] if k != "config"])
  _write_csv(paths[1], rows, SUMMARY_COLUMNS)
  differences = paired_differences(records)
  paths[2].write_text(markdown_table(rows) + differences_table(differences))
  plot(rows, paths[3])
  _write_csv(paths[4], differences, ["qkv", "baseline", "heads", "hidden_size", "seeds",
                                     "difference_mean", "ci95_low", "ci95_high"])
  gathered = collect_analyses(records, out_dir)
  if gathered:
    gathered.append(plot_analyses(out_dir, out_dir / "analysis_by_heads.png"))
    for qkv in sorted({r["qkv"] for r in records}):
      if models_by_heads(out_dir, qkv):
        gathered.append(plot_models(out_dir, qkv, out_dir / f"analysis_models_{qkv}.png"))
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


def analysis_by_heads(out_dir: Path) -> dict[str, dict[int, dict[str, float]]]:
  """From the gathered analyses: per mode and head count, the mean accuracy lost when one
  head is removed alone (over layers, heads and seeds; zero-ablation) and the mean effective
  rank of the heads' W_QK as a share of the head dim (its largest possible rank)."""
  out: dict[str, dict[int, dict[str, list[float]]]] = {}

  def add(row, key, value):
    out.setdefault(row["qkv"], {}).setdefault(int(row["heads"]), {}).setdefault(
        key, []).append(value)

  importance, spectra = out_dir / "analysis_head_importance.csv", \
      out_dir / "analysis_projection_spectra.csv"
  for row in _read_rows(importance):
    add(row, "accuracy_drop", float(row["accuracy_drop"]))
  for row in _read_rows(spectra):
    if row["matrix"] == "W_QK":
      head_dim = int(row["hidden_size"]) // int(row["heads"])
      add(row, "qk_rank_share", float(row["effective_rank"]) / head_dim)
  return {qkv: {h: {k: float(np.mean(v)) for k, v in d.items()} for h, d in by_heads.items()}
          for qkv, by_heads in out.items()}


def _read_rows(path: Path) -> list[dict[str, str]]:
  if not path.is_file():
    return []
  with path.open(newline="") as f:
    return list(csv.DictReader(f))


def plot_analyses(out_dir: Path, path: Path) -> Path:
  """`analysis_by_heads` against heads, a line per mode."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  means = analysis_by_heads(out_dir)
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  for ax, key, ylabel in ((axes[0], "accuracy_drop", "accuracy lost, one head removed"),
                          (axes[1], "qk_rank_share", "W_QK effective rank / head dim")):
    for qkv, by_heads in sorted(means.items()):
      heads = sorted(h for h in by_heads if key in by_heads[h])
      ax.plot(heads, [by_heads[h][key] for h in heads], marker="o", label=qkv)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="heads", ylabel=ylabel)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


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


def plot_models(out_dir: Path, qkv: str, path: Path, seed: int = 0) -> Path:
  """`models_by_heads` drawn, a column per head count: above, the accuracy lost with each
  head removed (layers x heads, each its own colour scale); below, each head's W_QK
  singular values over its largest, a line per head coloured by layer (dark: first)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  models = models_by_heads(out_dir, qkv, seed)
  fig, axes = plt.subplots(2, len(models), figsize=(2.8 * len(models), 5.6), squeeze=False,
                           layout="constrained")
  for column, heads in enumerate(sorted(models)):
    model, (above, below) = models[heads], axes[:, column]
    image = above.imshow(100 * model["drops"], cmap="magma", vmin=0, aspect="auto")
    fig.colorbar(image, ax=above, label="points lost" if column == len(models) - 1 else None)
    above.set(title=f"{qkv}, {heads} head{'s' * (heads > 1)}", xlabel="head")
    above.set_xticks(range(0, heads, max(1, heads // 8)))
    above.set_yticks(range(model["drops"].shape[0]))
    layers = model["drops"].shape[0]
    for (layer, _), values in sorted(model["qk_spectra"].items()):
      below.semilogy(np.arange(1, len(values) + 1), np.asarray(values) / values[0],
                     color=plt.cm.viridis(layer / max(layers - 1, 1)), alpha=0.6, lw=1)
    below.set(xlabel="singular value index")
  axes[0, 0].set_ylabel("layer (accuracy lost,\none head removed)")
  axes[1, 0].set_ylabel("W_QK singular values\nover the largest")
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path
