"""Model FLOPs per image, counted from the architecture, and XLA's count to check them."""

from __future__ import annotations

from vit_jax.model_configs import ModelConfig


def forward_flops(c: ModelConfig) -> int:
  """Multiply-adds x 2 of one image's forward pass (matmuls and attention only)."""
  n = c.num_tokens
  d, p = c.hidden_size, c.patch_window
  qkv = 0 if c.qkv == "identity" else 3 * n * d * d
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
