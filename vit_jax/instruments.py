"""Instruments for what the projections do to each head, measured on a trained model.

- `head_importance`: the loss and accuracy with each head removed alone (its output zeroed
  before the heads merge, `attention.remove_heads`, or replaced by its mean output over the
  images, `head_means`: mean-ablation), and `pruning_curve`, the accuracy as heads are
  removed cumulatively, least important (by that single-head loss) first;
- `projection_spectra`: for every layer and head, the singular values and effective rank of
  its slices of W_Q, W_K, W_V, of the bilinear form W_Q^h (W_K^h)ᵀ that its scores use, and
  of W_V^h W_O^h, the map from a token to what the head adds to the residual stream;
- `attention_distance`: the mean distance in pixels between a query patch and the patches it
  attends to (the ViT paper's figure of distance against depth), per layer and head;
- `head_redundancy`: the Jensen-Shannon divergence between the attention maps of every two
  heads of a layer, per layer.

Layer 4 of vit_jax.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import analysis, attention, input_pipeline
from vit_jax.model_configs import ModelConfig
from vit_jax.models import layer_projections
from vit_jax.steps import cross_entropy


def masked_evaluator(apply_fn, params, dataset: str, batch_size: int = 500,
                     head_means: np.ndarray | None = None):
  """-> evaluate(images, labels, head_mask (L, H)) -> (mean loss, accuracy); compiled once.

  head_means: optional (L, H, N, D/H) (`head_means`): removed heads output these, not zeros.
  """

  @jax.jit
  def batch_sums(images, labels, head_mask):
    logits = apply_fn({"params": params}, input_pipeline.normalize(images, dataset),
                      head_mask=head_mask, head_means=head_means)
    correct = (logits.argmax(-1) == labels).sum()
    return cross_entropy(logits, labels).sum(), correct

  def evaluate(images: np.ndarray, labels: np.ndarray, head_mask) -> tuple[float, float]:
    loss = correct = 0.0
    for i in range(0, len(labels), batch_size):
      batch_loss, batch_correct = batch_sums(images[i:i + batch_size],
                                             labels[i:i + batch_size], head_mask)
      loss, correct = loss + float(batch_loss), correct + float(batch_correct)
    return loss / len(labels), correct / len(labels)

  return evaluate


def head_means(apply_fn, params, model: ModelConfig, images: np.ndarray, dataset: str,
               batch_size: int = 500) -> np.ndarray:
  """Every head's output before the heads merge, averaged over `images` (uint8, (B, 28, 28,
  1)): (L, H, N, D/H), the values a mean-ablated head outputs instead of its own.

  Each layer's heads are computed again (`attention.attend_heads`, the einsum path) from
  the input its attention received, captured in one forward pass.
  """
  def is_attention_input(module, _):
    return module.name == "norm1"  # each block's LayerNorm before its attention

  @jax.jit
  def batch_sums(batch):
    _, variables = apply_fn({"params": params}, input_pipeline.normalize(batch, dataset),
                            capture_intermediates=is_attention_input, mutable=["intermediates"])
    blocks = variables["intermediates"]["encoder"]
    sums = []
    for layer in range(model.num_layers):
      x = blocks[f"block{layer}"]["norm1"]["__call__"][0]
      heads, _ = attention.attend_heads(x, layer_projections(params, model, layer),
                                        model.num_heads, compute_dtype=model.compute_dtype)
      sums.append(heads.astype(jnp.float32).sum(0))
    return jnp.stack(sums)

  total = sum(np.asarray(batch_sums(images[i:i + batch_size]), np.float64)
              for i in range(0, len(images), batch_size))
  return (total / len(images)).astype(np.float32)


def head_importance(evaluate, model: ModelConfig, images, labels) -> dict[str, np.ndarray]:
  """Each head removed alone: {'loss', 'accuracy'} (L, H), and the intact 'base_*'."""
  shape = (model.num_layers, model.num_heads)
  base_loss, base_accuracy = evaluate(images, labels, jnp.ones(shape))
  loss, accuracy = np.zeros(shape), np.zeros(shape)
  for layer in range(shape[0]):
    for head in range(shape[1]):
      mask = jnp.ones(shape).at[layer, head].set(0.0)
      loss[layer, head], accuracy[layer, head] = evaluate(images, labels, mask)
  return {"loss": loss, "accuracy": accuracy, "base_loss": np.float64(base_loss),
          "base_accuracy": np.float64(base_accuracy)}


def pruning_curve(evaluate, importance: dict[str, np.ndarray], images, labels
                  ) -> list[tuple[int, tuple[int, int] | None, float, float]]:
  """Heads removed one more at a time, the least important (lowest loss alone) first:
  [(heads removed, the head removed last as (layer, head), loss, accuracy)]."""
  shape = importance["loss"].shape
  order = np.argsort(importance["loss"], axis=None, kind="stable")
  mask = np.ones(shape)
  curve = [(0, None, float(importance["base_loss"]), float(importance["base_accuracy"]))]
  for removed, flat in enumerate(order, start=1):
    layer, head = np.unravel_index(flat, shape)
    mask[layer, head] = 0.0
    loss, accuracy = evaluate(images, labels, jnp.asarray(mask))
    curve.append((removed, (int(layer), int(head)), loss, accuracy))
  return curve


def effective_rank(singular_values: np.ndarray) -> float:
  """exp of the entropy of the normalised singular values (Roy & Vetterli, 2007): between 1
  (one direction) and the number of values (all equal)."""
  s = np.asarray(singular_values, np.float64)
  p = s / s.sum()
  p = p[p > 0]
  return float(np.exp(-(p * np.log(p)).sum()))


def head_projections(params: Any, model: ModelConfig, layer: int
                     ) -> dict[str, list[np.ndarray]]:
  """A layer's per-head slices: {'W_Q', 'W_K', 'W_V': H x (D, D/H), 'W_O': H x (D/H, D)}.

  Where a mode has no matrix (the identity ablations), it is the identity's columns."""
  weights = layer_projections(params, model, layer)
  width, dh = model.hidden_size, model.head_dim
  if "to_qkv" in weights:
    kernels = np.split(np.asarray(weights["to_qkv"]["kernel"]), 3, axis=1)
  else:
    kernels = [np.asarray(weights[f"to_{t}"]["kernel"]) if f"to_{t}" in weights
               else np.eye(width) for t in "qkv"]
  out = {name: [k[:, h * dh:(h + 1) * dh] for h in range(model.num_heads)]
         for name, k in zip(("W_Q", "W_K", "W_V"), kernels, strict=True)}
  w_o = np.asarray(weights["to_out"]["kernel"])
  out["W_O"] = [w_o[h * dh:(h + 1) * dh] for h in range(model.num_heads)]
  return out


def projection_spectra(params: Any, model: ModelConfig) -> list[dict[str, Any]]:
  """One record per (layer, head, matrix): its singular values and effective rank, for
  W_Q, W_K, W_V, W_QK = W_Q (W_K)ᵀ (D x D, rank <= D/H) and W_VO = W_V W_O (D x D)."""
  records = []
  for layer in range(model.num_layers):
    w = head_projections(params, model, layer)
    for head in range(model.num_heads):
      matrices = {"W_Q": w["W_Q"][head], "W_K": w["W_K"][head], "W_V": w["W_V"][head],
                  "W_QK": w["W_Q"][head] @ w["W_K"][head].T,
                  "W_VO": w["W_V"][head] @ w["W_O"][head]}
      for name, matrix in matrices.items():
        singular = np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)
        singular = singular[:model.head_dim]  # the products' rank is at most D/H
        records.append({"layer": layer, "head": head, "matrix": name,
                        "singular_values": singular.tolist(),
                        "effective_rank": effective_rank(singular)})
  return records


def patch_distances(grid: int, patch_size: int) -> np.ndarray:
  """(grid², grid²) pixel distances between the centres of every two patches."""
  rows, cols = np.divmod(np.arange(grid * grid), grid)
  centres = np.stack([rows, cols], axis=-1) * patch_size
  return np.linalg.norm(centres[:, None] - centres[None, :], axis=-1)


def attention_distance(maps: np.ndarray, grid: int, patch_size: int) -> np.ndarray:
  """(L, B, H, N, N) maps -> (L, H): the mean over images and query patches of the
  attention-weighted pixel distance to the key patches. The class token (the first of
  N = 1 + grid² tokens, when there is one) is left out, as query and as key."""
  maps = np.asarray(maps, np.float64)
  patches = maps[..., -grid * grid:, -grid * grid:]
  # Weights renormalised over the patches: the class token's share has no place.
  patches = patches / patches.sum(-1, keepdims=True)
  return (patches * patch_distances(grid, patch_size)).sum(-1).mean(axis=(1, 3))


def head_redundancy(maps: np.ndarray, images_at_once: int = 16) -> np.ndarray:
  """(L, B, H, N, N) maps -> (L, H, H): the Jensen-Shannon divergence (nats, 0 to log 2)
  between every two heads' attention distributions, averaged over images and queries.

  A layer's pairs of heads are compared `images_at_once` images at a time: all at once, the
  arrays of L B H² N² float64s took about 14 GB for the `seed` ViT at 2,000 images."""
  layers, images, heads, queries, _ = np.shape(maps)

  def kl(a, b):
    a_log_a_b = a * (np.log(np.clip(a, 1e-30, None)) - np.log(np.clip(b, 1e-30, None)))
    return np.where(a > 0, a_log_a_b, 0.0).sum(-1)

  total = np.zeros((layers, heads, heads))
  for layer in range(layers):
    for start in range(0, images, images_at_once):
      chunk = np.asarray(maps[layer, start:start + images_at_once], np.float64)
      p, q = chunk[:, :, None], chunk[:, None]  # (b, H, 1, N, N), (b, 1, H, N, N)
      m = (p + q) / 2
      total[layer] += (0.5 * kl(p, m) + 0.5 * kl(q, m)).sum(axis=(0, 3))
  return total / (images * queries)


def attention_statistics(maps: np.ndarray, model: ModelConfig) -> dict[str, float]:
  """Per layer and head, the mean entropy (nats) and mean distance (pixels) of `maps`, as
  metrics: {'attention_entropy/layer0/head0': ..., 'attention_distance/layer0/head0': ...}."""
  maps = np.asarray(maps, np.float64)
  grid = model.image_size // model.patch_size
  distance = attention_distance(maps, grid, model.patch_size)
  entropy = analysis.query_entropies(maps).mean(axis=(1, 3))  # (L, B, H, N) -> (L, H)
  out = {}
  for layer, head in np.ndindex(distance.shape):
    out[f"attention_entropy/layer{layer}/head{head}"] = float(entropy[layer, head])
    out[f"attention_distance/layer{layer}/head{head}"] = float(distance[layer, head])
  return out


def effective_ranks(params: Any, model: ModelConfig) -> dict[str, float]:
  """Every head's effective ranks as metrics: {'effective_rank/W_QK/layer0/head0': ...}."""
  return {f"effective_rank/{r['matrix']}/layer{r['layer']}/head{r['head']}": r["effective_rank"]
          for r in projection_spectra(params, model)}
