"""A sweep's pictures, drawn from what `sweep_report` computes: accuracy and entropy against
heads (sweep.png), the instruments against heads (analysis_by_heads.png), and one model per
head count (analysis_models_<qkv>.png).

Layer 5 of vit_jax: it draws numbers and reads no file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vit_jax.figures import pyplot, save_png

LABELS = {"fused": "learned Q/K/V", "separate": "learned W_Q, W_K, W_V",
          "identity": "identity (no projection)"}


def _pyplot():
  plt = pyplot()  # first: it chooses the backend
  import matplotlib

  return matplotlib, plt


def _heads_axis(ax, heads, ylabel: str) -> None:
  matplotlib, _ = _pyplot()
  ax.set_xscale("log", base=2)
  ax.set_xticks(sorted(heads))
  ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
  ax.set(xlabel="heads", ylabel=ylabel)
  ax.grid(alpha=0.3)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
  """`sweep_report.summarize`'s rows: test accuracy (error bars: std over seeds) and
  attention entropy against heads, a line per mode."""
  _, plt = _pyplot()
  fig, (acc_ax, ent_ax) = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
  for qkv in sorted({r["qkv"] for r in rows}):
    mine = sorted((r for r in rows if r["qkv"] == qkv), key=lambda r: r["heads"])
    heads, label = [r["heads"] for r in mine], LABELS.get(qkv, qkv)
    acc_ax.errorbar(heads, [100 * r["accuracy_mean"] for r in mine],
                    yerr=[100 * r["accuracy_std"] for r in mine], marker="o", capsize=3,
                    label=label)
    ent_ax.plot(heads, [r["entropy_mean"] for r in mine], marker="o", label=label)
  all_heads = {r["heads"] for r in rows}
  _heads_axis(acc_ax, all_heads, "test accuracy (%)")
  _heads_axis(ent_ax, all_heads, "mean attention entropy (nats)")
  acc_ax.legend(fontsize=8)
  return save_png(fig, path)


def plot_analyses(means: dict[str, dict[int, dict[str, float]]], path: Path) -> Path:
  """`sweep_report.analysis_by_heads`: the accuracy lost with one head removed, the W_QK
  rank share and the JS divergence between heads against heads, a line per mode."""
  _, plt = _pyplot()
  # (key, its ablation in the legend, scale): the drops in points, as `plot_models` shows them.
  panels = (([("accuracy_drop", "", 100), ("accuracy_drop_mean_ablation", ", mean-ablated", 100)],
             "accuracy lost, one head removed (points)"),
            ([("qk_rank_share", "", 1)], "W_QK effective rank / head dim"),
            ([("js_divergence", "", 1)], "JS divergence between heads"))
  fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.6), layout="constrained")
  for ax, (lines, ylabel) in zip(axes, panels, strict=True):
    for colour, (qkv, by_heads) in enumerate(sorted(means.items())):  # a mode's, every panel
      for (key, ablation, scale), style in zip(lines, ("-", "--"), strict=False):
        heads = sorted(h for h in by_heads if key in by_heads[h])
        if heads:
          ax.plot(heads, [scale * by_heads[h][key] for h in heads], style, marker="o",
                  color=f"C{colour}", label=qkv + ablation)
    _heads_axis(ax, {h for by_heads in means.values() for h in by_heads}, ylabel)
  axes[0].legend(fontsize=8)
  return save_png(fig, path)


def plot_models(models: dict[int, dict[str, Any]], qkv: str, path: Path) -> Path:
  """`sweep_report.models_by_heads`, a column per head count: above, the accuracy lost with
  each head removed (layers x heads, each its own colour scale); below, each head's W_QK
  singular values over its largest, a line per head coloured by layer (dark: first)."""
  matplotlib, plt = _pyplot()
  fig, axes = plt.subplots(2, len(models), figsize=(2.8 * len(models), 5.6), squeeze=False,
                           layout="constrained")
  for column, heads in enumerate(sorted(models)):
    model, (above, below) = models[heads], axes[:, column]
    image = above.imshow(100 * model["drops"], cmap="magma", aspect="auto")  # < 0: it helped
    fig.colorbar(image, ax=above, label="points lost" if column == len(models) - 1 else None)
    above.set(title=f"{qkv}, {heads} head{'s' * (heads > 1)}", xlabel="head")
    above.set_xticks(range(0, heads, max(1, heads // 8)))
    layers = model["drops"].shape[0]
    above.set_yticks(range(layers))
    for (layer, _), values in sorted(model["qk_spectra"].items()):
      below.semilogy(np.arange(1, len(values) + 1), np.asarray(values) / values[0],
                     color=plt.cm.viridis(layer / max(layers - 1, 1)), alpha=0.6, lw=1)
    below.set(xlabel="singular value index")
  axes[0, 0].set_ylabel("layer (accuracy lost,\none head removed)")
  axes[1, 0].set_ylabel("W_QK singular values\nover the largest")
  return save_png(fig, path, dpi=90)
