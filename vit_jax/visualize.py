"""Pictures of a trained model: attention over the digit, rollout, position embeddings.

    python launch.py --config=... --workdir=runs/mnist --mode=visualize

writes PNGs into WORKDIR/visualize/. Uses the attention weights the model returns
beside its logits (no second forward pass written by hand).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vit_jax import analysis
from vit_jax.figures import pyplot, save_png
from vit_jax.metrics import read_metrics
from vit_jax.model_configs import ModelConfig

plt = pyplot()

DPI = 100


def _overlay(ax, image: np.ndarray, weights: np.ndarray, grid: int, title: str | None = None):
  """Draws a digit in grey with (grid*grid,) patch weights as a translucent heat map."""
  size = image.shape[0]
  heat = np.kron(weights.reshape(grid, grid), np.ones((size // grid, size // grid)))
  ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
  ax.imshow(heat, cmap="inferno", alpha=0.6, vmin=0, vmax=max(float(heat.max()), 1e-9))
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=8)


def plot_attention(image: np.ndarray, per_head: np.ndarray, config: ModelConfig, label: int,
                   predicted: int, path: Path) -> Path:
  """One digit: a row per layer, a column per head, the classifier's attention over patches.

  per_head: (L, H, patches) from `analysis.query_attention`.
  """
  layers, heads, _ = per_head.shape
  grid = config.image_size // config.patch_size
  # Constrained layout keeps the panels' titles off each other and below the figure's title.
  fig, axes = plt.subplots(layers, heads, figsize=(max(1.6 * heads, 2.4), 1.7 * layers + 0.6),
                           squeeze=False, layout="constrained")
  for layer in range(layers):
    for head in range(heads):
      _overlay(axes[layer, head], image, per_head[layer, head], grid,
               f"layer {layer} head {head}")  # from 0, as the metrics and analyses count
  source = "class token" if config.classifier == "token" else "mean query"
  fig.suptitle(f"attention from the {source}:{' ' if heads > 2 else chr(10)}label {label}, "
               f"predicted {predicted}", fontsize=9)  # two lines where one would be cut off
  return save_png(fig, path, DPI)


ROLLOUT_IMAGES = 16  # one row, readable; hundreds would pass matplotlib's largest figure


def plot_rollout(images: np.ndarray, rollout: np.ndarray, config: ModelConfig,
                 path: Path) -> Path:
  """A row of digits with their attention rollout: the first `ROLLOUT_IMAGES` of them.

  images: uint8 (B, H, W, C); rollout: (B, N, N) from `analysis.attention_rollout`.
  """
  grid = config.image_size // config.patch_size
  weights = analysis.query_attention(rollout, config.classifier)  # (B, patches)
  n = min(len(images), ROLLOUT_IMAGES)
  fig, axes = plt.subplots(1, n, figsize=(1.6 * n, 2.0), squeeze=False)
  for i in range(n):
    _overlay(axes[0, i], images[i], weights[i], grid)
  fig.suptitle("attention rollout across all layers", fontsize=9)
  fig.tight_layout()
  return save_png(fig, path, DPI)


def plot_position_similarity(similarity: np.ndarray, config: ModelConfig, path: Path) -> Path:
  """For each patch position, the cosine similarity of its embedding to every other's.

  similarity: (patches, patches) from `analysis.position_similarity`.
  """
  grid = config.image_size // config.patch_size
  fig, axes = plt.subplots(grid, grid, figsize=(grid * 0.9, grid * 0.9 + 0.4), squeeze=False)
  for i in range(grid * grid):
    ax = axes[i // grid, i % grid]
    ax.imshow(similarity[i].reshape(grid, grid), cmap="viridis", vmin=-1, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle("position embedding similarity (row, column of the patch)", fontsize=9)
  fig.tight_layout()
  return save_png(fig, path, DPI)


def write_all(state, config: ModelConfig, images: np.ndarray, labels: np.ndarray,
              dataset: str, out_dir: Path) -> list[Path]:
  """Writes every picture for `images` (uint8 (B, H, W, C) of `dataset`) into `out_dir`."""
  out_dir.mkdir(parents=True, exist_ok=True)
  logits, maps = analysis.collect_attention(state, images, dataset)
  predicted = logits.argmax(-1)
  per_head = analysis.query_attention(maps, config.classifier)  # (L, B, H, patches)
  paths = [plot_attention(images[i], per_head[:, i], config, int(labels[i]), int(predicted[i]),
                          out_dir / f"attention_{i}.png") for i in range(len(images))]
  paths.append(plot_rollout(images, analysis.attention_rollout(maps), config,
                            out_dir / "rollout.png"))
  similarity = analysis.position_similarity(state.params["pos_embedding"], config.num_patches)
  paths.append(plot_position_similarity(similarity, config, out_dir / "position_similarity.png"))
  return paths


def plot_training_statistics(metrics_file: Path, path: Path) -> Path | None:
  """From a run's metrics.jsonl: each layer's mean attention distance and entropy (over its
  heads) at every evaluation, and the mean effective rank of each projection at every
  checkpoint, against the step. None where the run logged none (runs before 2026-12-02)."""
  records = read_metrics(metrics_file.parent)
  panels = (("attention_distance", "mean attention distance (pixels)"),
            ("attention_entropy", "mean attention entropy (nats)"),
            ("effective_rank", "mean effective rank"))
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  drawn = False
  for ax, (prefix, label) in zip(axes, panels, strict=True):
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
      by_line: dict[str, list[float]] = {}
      for key, value in r.items():
        if key.startswith(prefix + "/"):
          parts = key.split("/")  # prefix[/matrix]/layerL/headH: one line per layer or matrix
          by_line.setdefault(parts[1], []).append(value)
      for line, values in by_line.items():
        series.setdefault(line, []).append((r["step"], float(np.mean(values))))
    for line, points in sorted(series.items()):
      ax.plot(*zip(*points, strict=True), marker=".", label=line)
      drawn = True
    ax.set(xlabel="step", ylabel=label)
    if series:
      ax.legend(fontsize=6)
  if not drawn:
    plt.close(fig)
    return None
  fig.tight_layout()
  return save_png(fig, path, DPI)


def visualize_checkpoint(config, workdir, num_images: int = 4, test_data=None,
                         out_dir=None) -> list[Path]:
  """Pictures of the latest checkpoint in `workdir` on the first test digits, written to
  `out_dir` (default WORKDIR/visualize)."""
  from vit_jax import inference

  config, state, images, labels = inference.restore_with_test_images(config, workdir,
                                                                      num_images, test_data)
  out_dir = Path(out_dir or Path(workdir) / "visualize")
  # An earlier call's pictures of other digits or of no statistics would sit beside these.
  for stale in [*out_dir.glob("attention_[0-9]*.png"), out_dir / "training_statistics.png"]:
    stale.unlink(missing_ok=True)
  paths = write_all(state, config.model, images, labels, config.dataset, out_dir)
  metrics_file = Path(workdir) / "metrics.jsonl"
  if metrics_file.is_file():
    paths.append(plot_training_statistics(metrics_file, out_dir / "training_statistics.png"))
  return [p for p in paths if p is not None]
