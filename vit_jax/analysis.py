"""What the attention did: maps from a trained state, their entropy, rollout, positions.

The maps come from the attention weights the model sows during its ordinary
forward pass (`models.attention_maps`); nothing here re-implements attention.
"""

from __future__ import annotations

import jax
import numpy as np

from vit_jax import input_pipeline
from vit_jax.models import attention_maps


def forward_with_attention(apply_fn, dataset: str):
  """-> forward(params, uint8 images (B, H, W, C) of `dataset`) -> (logits (B, K), maps
  (L, B, H, N, N)), compiled once: the model's intermediates beside its logits."""

  @jax.jit
  def forward(params, images):
    logits, variables = apply_fn({"params": params}, input_pipeline.normalize(images, dataset),
                                 mutable=["intermediates"])
    return logits, attention_maps(variables["intermediates"])

  return forward


def collect_attention(state, images: np.ndarray, dataset: str,
                      batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
  """Runs the model on uint8 images (B, H, W, C) of `dataset` -> logits (B, K), maps
  (L, B, H, N, N)."""
  forward = forward_with_attention(state.apply_fn, dataset)
  outputs = [forward(state.params, images[i:i + batch_size])
             for i in range(0, len(images), batch_size)]
  logits = np.concatenate([np.asarray(o[0]) for o in outputs])
  maps = np.concatenate([np.asarray(o[1]) for o in outputs], axis=1)
  return logits, maps


def query_entropies(maps: np.ndarray) -> np.ndarray:
  """The entropy (nats) of each query's attention distribution: (..., N, N) -> (..., N).

  log(N) for uniform attention; 0 when a query attends to a single key.
  """
  p = np.asarray(maps, np.float64)
  return -np.sum(p * np.log(np.clip(p, 1e-12, None)), axis=-1)


def attention_entropy(maps: np.ndarray) -> float:
  """Mean entropy (nats) of the attention distributions in (..., N, N) maps."""
  return float(np.mean(query_entropies(maps)))


def attention_rollout(maps: np.ndarray) -> np.ndarray:
  """Attention rollout (Abnar & Zuidema, 2020): (L, B, H, N, N) -> (B, N, N).

  Heads are averaged, the residual connection is added as identity, rows are
  renormalised, and the layers are multiplied from the first to the last.
  """
  maps = np.asarray(maps, np.float64)
  num_layers, batch, _, tokens, _ = maps.shape
  rollout = np.broadcast_to(np.eye(tokens), (batch, tokens, tokens))
  for layer in range(num_layers):
    a = maps[layer].mean(axis=1) + np.eye(tokens)
    a = a / a.sum(axis=-1, keepdims=True)
    rollout = a @ rollout
  return rollout


def position_similarity(pos_embedding: np.ndarray, num_patches: int) -> np.ndarray:
  """Cosine similarity of the patches' position embeddings: -> (num_patches, num_patches).

  A leading class-token row in `pos_embedding` (1, T, D) is dropped.
  """
  pos = np.asarray(pos_embedding)[0, -num_patches:]
  pos = pos / np.linalg.norm(pos, axis=-1, keepdims=True)
  return pos @ pos.T


def query_attention(maps: np.ndarray, classifier: str) -> np.ndarray:
  """What the classifier reads: (..., N, N) maps, e.g. (L, B, H, N, N) -> (..., patches).

  With a class token: its attention over the patches. With average pooling: the
  mean attention over all queries.
  """
  maps = np.asarray(maps)
  if classifier == "token":
    return maps[..., 0, 1:]
  return maps.mean(axis=-2)
