"""Model FLOPs per image, counted from the architecture, and XLA's count to check them."""

from __future__ import annotations

from vit_jax.model_configs import ModelConfig


def forward_flops(c: ModelConfig) -> int:
  """Multiply-adds x 2 of one image's forward pass (matmuls and attention only)."""
  n = c.num_tokens
  d, p = c.hidden_size, c.patch_window
  # The D x D products that make Q, K and V: an identity one is none, tied Q and K one (XLA
  # computes x W_QK once); low_rank and frozen_random multiply by full D x D matrices, as
  # `models.projection_weights` builds them.
  products = {"identity": 0, "identity_q": 2, "identity_k": 2, "identity_v": 2,
              "tied_qk": 2}.get(c.qkv, 3)
  qkv = products * n * d * d
  per_layer = qkv + 2 * n * n * d + n * d * d + 2 * n * d * c.mlp_dim  # QK^T and AV: 2 n^2 d
  return 2 * (c.num_patches * p * p * c.num_channels * d + c.num_layers * per_layer
              + d * c.num_classes)


def train_flops(c: ModelConfig) -> int:
  """Forward plus backward (twice the forward: gradients for inputs and weights)."""
  return 3 * forward_flops(c)


def xla_flops(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):  # older JAX: one dict per device program
    analysis = analysis[0]
  return float(analysis["flops"]) if analysis and "flops" in analysis else None
