"""The straightforward baseline: a plain Flax ViT of the same shape, timed beside ours.

What a user would write first: flax.linen's own modules (a strided `nn.Conv` patch embedding,
`nn.LayerNorm`, `nn.MultiHeadDotProductAttention`, `nn.Dense`), whole-batch passes (no
micro-batches), no kernel, float32, `jax.jit` on one device, optax's AdamW. Its ratio to this
codebase's training step is what the engineering buys on the machine at hand.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax.benchmark import timing
from vit_jax.experiment_config import ExperimentConfig
from vit_jax.model_configs import ModelConfig


class PlainViT(nn.Module):
  """The `seed`-style ViT from flax.linen's parts: (B, H, W, C) images -> (B, K) logits.

  The same shape as `models.ViT`; flax's attention adds a bias to Q, K and V (3 x width
  parameters a layer more than the fused `to_qkv`, which has none).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    c = self.config
    o = c.patch_overlap  # patches reaching into their neighbours, padded as `patchify` pads
    images = jnp.pad(images, ((0, 0), (o, o), (o, o), (0, 0)), "edge")
    x = nn.Conv(c.hidden_size, (c.patch_window,) * 2, strides=(c.patch_size,) * 2,
                padding="VALID")(images)
    x = x.reshape(x.shape[0], -1, c.hidden_size)
    cls = self.param("cls_token", nn.initializers.zeros, (1, 1, c.hidden_size))
    x = jnp.concatenate([jnp.tile(cls, (x.shape[0], 1, 1)), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1],
                                                                     c.hidden_size))
    for _ in range(c.num_layers):
      y = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=c.num_heads)(y, y)
      y = nn.Dense(c.mlp_dim)(nn.LayerNorm()(x))
      x = x + nn.Dense(c.hidden_size)(nn.gelu(y))
    return nn.Dense(c.num_classes)(nn.LayerNorm()(x)[:, 0])


def train_step_function(model: PlainViT, tx: optax.GradientTransformation):
  """The plain step, jitted: (params, opt_state, images, labels) -> (params, opt_state, loss)."""

  def loss_fn(params, images, labels):
    logits = model.apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(params, opt_state, images, labels):
    loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


# What the plain ViT has of each model field it does not follow: a config that sets another
# value times our model against a different one.
PLAIN = {"qkv": ("fused", "separate"), "classifier": ("token",), "dropout_rate": (0.0,),
         "drop_path_rate": (0.0,)}


def differences(config: ExperimentConfig) -> list[str]:
  """The config's model fields that the plain ViT does not have, e.g. ["model.qkv='identity'"]:
  where there are any, the speed-up compares two models, not two implementations."""
  return [f"model.{k}={getattr(config.model, k)!r}" for k, plain in PLAIN.items()
          if getattr(config.model, k) not in plain]


def measure(config: ExperimentConfig, peak: timing.MatmulPeak, steps_per_window: int,
            windows: int) -> dict[str, Any]:
  """Training images/s of the plain ViT at the config's batch, on one device, and the model
  fields it differs in (`differences`)."""
  c = config.model
  model = PlainViT(c)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random((config.batch_size, c.image_size, c.image_size,
                                   c.num_channels), np.float32))
  labels = jnp.asarray(rng.integers(0, c.num_classes, config.batch_size).astype(np.int32))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])["params"]
  tx = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
  step = train_step_function(model, tx)
  holder = {"state": (params, tx.init(params))}

  def window():
    state = holder["state"]
    for _ in range(steps_per_window):
      *state, loss = step(*state, images, labels)
    jax.block_until_ready(loss)
    holder["state"] = tuple(state)

  return {"baseline_train_images_per_sec": timing.images_per_second(
      window, windows, config.batch_size * steps_per_window, peak),
          "baseline_differs_in": differences(config)}
