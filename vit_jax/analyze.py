"""`launch.py --mode=analyze`: the head instruments on a run's latest checkpoint.

    python launch.py --workdir=runs/mnist --mode=analyze [--output_dir=DIR] [--num_images=N]
        [--ablation=mean]

writes into WORKDIR/analysis/ (or DIR), as CSV and PNG: each head's importance (a layers x
heads heatmap of the accuracy lost when it alone is removed: its output zeroed, or with
`ablation='mean'` replaced by its mean output over the images, in files named *_mean) and
the pruning curve; the
projection spectra (effective rank of every head's W_Q, W_K, W_V, W_QK and W_VO, singular
values per layer); the attention statistics (mean entropy and mean attention distance in
pixels, per layer and head, against depth); head redundancy (Jensen-Shannon divergence
between the heads of each layer). `vit_jax.instruments` computes them; this draws them.

Layer 5 of vit_jax.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vit_jax import analysis, inference, instruments
from vit_jax.figures import pyplot, save_png
from vit_jax.files import write_csv_atomically

plt = pyplot()


def _heatmap(path: Path, matrix: np.ndarray, title: str, xlabel: str, ylabel: str) -> Path:
  fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 0.6 * matrix.shape[1]),
                                  1.0 + 0.5 * matrix.shape[0]))
  shown = ax.imshow(matrix, cmap="viridis")
  ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xticks=range(matrix.shape[1]),
         yticks=range(matrix.shape[0]))
  for (i, j), value in np.ndenumerate(matrix):
    ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=6, color="white")
  fig.colorbar(shown, ax=ax)
  fig.tight_layout()
  return save_png(fig, path)


def _importance(out: Path, evaluate, config, images, labels, suffix: str) -> list[Path]:
  importance = instruments.head_importance(evaluate, config.model, images, labels)
  curve = instruments.pruning_curve(evaluate, importance, images, labels)
  drop = importance["base_accuracy"] - importance["accuracy"]
  rows = [(layer, head, importance["loss"][layer, head], importance["accuracy"][layer, head],
           drop[layer, head]) for layer, head in np.ndindex(drop.shape)]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot([c[0] for c in curve], [c[3] for c in curve], marker="o")
  how = " (mean-ablated)" if suffix else ""
  ax.set(xlabel="heads removed (least important first)", ylabel="accuracy",
         title=f"pruning curve{how}")
  fig.tight_layout()
  save_png(fig, out / f"pruning_curve{suffix}.png")
  return [
      write_csv_atomically(out / f"head_importance{suffix}.csv",
                           ["layer", "head", "loss", "accuracy", "accuracy_drop"], rows),
      write_csv_atomically(out / f"pruning_curve{suffix}.csv",
                           ["heads_removed", "last_removed", "loss", "accuracy"],
                           [(n, "" if h is None else f"{h[0]}.{h[1]}", loss, acc)
                            for n, h, loss, acc in curve]),
      _heatmap(out / f"head_importance{suffix}.png", drop,
               f"accuracy lost with the head removed alone{how}", "head", "layer"),
      out / f"pruning_curve{suffix}.png"]


def _spectra(out: Path, params: Any, model) -> list[Path]:
  records = instruments.projection_spectra(params, model)
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  for ax, name in zip(axes, ("W_QK", "W_VO"), strict=True):
    for r in (r for r in records if r["matrix"] == name):
      ax.semilogy(r["singular_values"], color=plt.cm.viridis(r["layer"] / model.num_layers),
                  alpha=0.7, label=f"layer {r['layer']}" if r["head"] == 0 else None)
    ax.set(title=f"{name} per head: singular values", xlabel="index")
  axes[0].legend(fontsize=6)
  fig.tight_layout()
  save_png(fig, out / "projection_spectra.png")
  rows = [(r["layer"], r["head"], r["matrix"], r["effective_rank"],
           " ".join(f"{s:.6g}" for s in r["singular_values"])) for r in records]
  return [write_csv_atomically(out / "projection_spectra.csv", ["layer", "head", "matrix",
                               "effective_rank", "singular_values"], rows),
          out / "projection_spectra.png"]


def _attention_statistics(out: Path, maps: np.ndarray, model) -> list[Path]:
  grid = model.image_size // model.patch_size
  distance = instruments.attention_distance(maps, grid, model.patch_size)
  entropy = analysis.query_entropies(maps).mean(axis=(1, 3))  # (L, B, H, N) -> (L, H)
  redundancy = instruments.head_redundancy(maps)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for head in range(model.num_heads):
    ax.scatter(range(model.num_layers), distance[:, head], label=f"head {head}", s=15)
  ax.set(xlabel="layer", ylabel="mean attention distance (pixels)", title="distance by depth")
  ax.legend(fontsize=6)
  fig.tight_layout()
  save_png(fig, out / "attention_distance.png")
  return [
      write_csv_atomically(
          out / "attention_statistics.csv", ["layer", "head", "entropy", "mean_distance_pixels"],
          [(i, j, entropy[i, j], distance[i, j]) for i, j in np.ndindex(entropy.shape)]),
      write_csv_atomically(
          out / "head_redundancy.csv", ["layer", "head_a", "head_b", "js_divergence"],
          [(i, a, b, redundancy[i, a, b]) for i, a, b in np.ndindex(redundancy.shape)]),
      _heatmap(out / "head_redundancy.png", redundancy.reshape(-1, model.num_heads),
               "JS divergence between heads (rows: layer x head)", "head", "layer x head"),
      out / "attention_distance.png"]


ABLATIONS = ("zero", "mean")


def check_ablations(ablations, name: str = "ablation") -> None:
  """A one-line ValueError, naming the field `name`, for a value not in `ABLATIONS`."""
  for ablation in ablations:
    if ablation not in ABLATIONS:
      raise ValueError(f"{name}={ablation!r} is not one of "
                       f"{', '.join(map(repr, ABLATIONS))}")


def done_marker(out_dir: str | Path, ablation: str) -> Path:
  """Written last by `analyze_checkpoint`: every file of that ablation's analysis is there
  (an interrupted analysis leaves none, and is redone)."""
  return Path(out_dir) / f"done_{ablation}"


def is_done(out_dir: str | Path, ablation: str, num_images: int) -> bool:
  """Whether `out_dir` holds that ablation's whole analysis on `num_images` test images."""
  marker = done_marker(out_dir, ablation)
  return marker.is_file() and marker.read_text() == _done_text(num_images)


def _done_text(num_images: int) -> str:
  return f"{num_images} test images\n"


def analyze_checkpoint(config: Any, workdir: str | Path, num_images: int = 1000,
                       output_dir: str | Path | None = None, test_data=None,
                       ablations: tuple[str, ...] = ("zero",)) -> list[Path]:
  """Every instrument on the first `num_images` test images; -> the files written.

  Each image is seen once, as it is: the test-time views (`eval_max_shift`, `eval_flip`) are
  not averaged over, so the accuracy a removed head is measured against is the one-view
  accuracy, not the run's `eval_accuracy` where it evaluated with views.

  ablations: how a removed head is removed, each one set of importance files: 'zero' (its
  output zeroed) or 'mean' (its output replaced by its mean over those images,
  `instruments.head_means`; files named *_mean). The other instruments are measured once.
  """
  check_ablations(ablations)
  config, state, images, labels = inference.restore_with_test_images(config, workdir,
                                                                      num_images, test_data)
  out = Path(output_dir or Path(workdir) / "analysis")
  out.mkdir(parents=True, exist_ok=True)
  for ablation in ABLATIONS:  # redone, or done on other images (the shared files change now):
    marker = done_marker(out, ablation)  # its tables are not whole again until it ends
    if ablation in ablations or (marker.is_file() and marker.read_text() != _done_text(
        num_images)):
      marker.unlink(missing_ok=True)
  _, maps = analysis.collect_attention(state, images, config.dataset)
  written = [*_spectra(out, state.params, config.model),
             *_attention_statistics(out, maps, config.model)]
  for ablation in ablations:
    means = None
    if ablation == "mean":
      means = instruments.head_means(state.apply_fn, state.params, config.model, images,
                                     config.dataset)
    evaluate = instruments.masked_evaluator(state.apply_fn, state.params, config.dataset,
                                            head_means=means)
    written += _importance(out, evaluate, config, images, labels,
                           "_mean" if ablation == "mean" else "")
    done_marker(out, ablation).write_text(_done_text(num_images))
  return written
