"""The ceiling XLA's matrix products set: the model's matmuls alone, timed."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import attention as A
from vit_jax import models
from vit_jax.benchmark import timing
from vit_jax.model_configs import ModelConfig
from vit_jax.parallel import Runner


def _products_only(q, k, v, mask, compute_dtype):
  """Step 4's two products without the softmax: the scores scaled by 1/N instead, which
  keeps the magnitudes steady."""
  del mask
  scores = A.products("bhqd,bhkd->bhqk", q, k, compute_dtype) / q.shape[-2]
  return A.products("bhqk,bhkd->bhqd", scores, v, compute_dtype), scores


def _matmuls_only(params: dict[str, Any], patches: jax.Array, c: ModelConfig) -> jax.Array:
  """The ViT's matmuls alone, in the model's order: no LayerNorm, softmax, GELU or optimizer.

  What XLA makes of the step's matrix products with everything else free of charge: the
  ceiling that a faster LayerNorm, softmax or GELU could approach, but not pass.
  """
  dtype = c.compute_dtype
  x = A.project(patches, params["embed"], compute_dtype=dtype)
  if c.classifier == "token":
    x = jnp.concatenate([x[:, :1], x], axis=1)
  for layer in params["layers"]:
    weights = layer["attention"]
    if c.qkv == "tied_qk":  # expanded inside the trace, as the model does: one x W_QK for XLA
      weights = {**models.projection_weights(weights, c.qkv, c.hidden_size, path=""),
                 "to_out": weights["to_out"]}
    x = x + A.self_attention(x, weights, c.num_heads, attend_fn=_products_only,
                             compute_dtype=dtype)[0]
    x = x + A.project(A.project(x, layer["fc1"], compute_dtype=dtype), layer["fc2"],
                      compute_dtype=dtype)
  return A.project(x[:, :1], params["head"], compute_dtype=dtype).sum()


def matmul_only_problem(c: ModelConfig, batch_size: int):
  """(loss, params, patches) for `_matmuls_only`: random weights of the model's shapes.

  `patches` is (batch_size, N, K*K*C), K the patch window (`ModelConfig.patch_window`);
  `loss(params, patches)` is a float32 scalar (the head's outputs summed, something to
  differentiate).
  """
  d, m = c.hidden_size, c.mlp_dim
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 8 * c.num_layers + 2))

  def weight(*shape):
    return jax.random.normal(next(keys), shape, jnp.float32) / np.sqrt(shape[0])

  def layer():
    # The matrices the model learns (`models.learned_projections`); low_rank and
    # frozen_random multiply full D x D ones (`models.projection_weights`), here one D -> 3D.
    full = models.learned_projections(c.qkv, d) or (
        {} if c.qkv == "identity" else {"to_qkv": 3 * d})
    attention = {name: {"kernel": weight(d, width)} for name, width in full.items()}
    attention["to_out"] = {"kernel": weight(d, d), "bias": jnp.zeros(d)}
    return {"attention": attention, "fc1": weight(d, m), "fc2": weight(m, d)}

  params = {"embed": weight(c.patch_window**2 * c.num_channels, d),
            "layers": [layer() for _ in range(c.num_layers)],
            "head": weight(d, c.num_classes)}
  patches = A.patchify(jax.random.normal(next(keys), (batch_size, c.image_size, c.image_size,
                                                      c.num_channels)), c.patch_size,
                        c.patch_overlap)
  return functools.partial(_matmuls_only, c=c), params, patches


def matmul_only_speed(c: ModelConfig, train_batch: int, eval_batch: int,
                      peak: timing.MatmulPeak, runner: Runner,
                      repeats: int = 10) -> dict[str, float]:
  """Images/s of `_matmuls_only`, with its gradient (train) and without (eval).

  Each call takes the batch that one micro-batch of the config's step takes (`train_batch`:
  a micro-batch from every device when the step accumulates), and is laid over the devices
  as `runner` lays the config's own step, so that the ceiling and the step it bounds
  multiply the same shapes on the same cores. Each device keeps its own gradient: the
  cross-device mean is not a matmul.
  """
  out = {}
  for key, batch_size in (("train", train_batch), ("eval", eval_batch)):
    loss, params, patches = matmul_only_problem(c, batch_size)
    params, patches = runner.replicate(params), runner.split_batch(np.asarray(patches))
    step = jax.grad(loss) if key == "train" else loss
    fn = runner.compile(lambda p, x, axis_name, step=step: step(p, x), in_axes=(0, 0))
    run_once = functools.partial(fn, params, patches)
    out[f"matmul_only_{key}_images_per_sec"] = timing.images_per_second(
        lambda run_once=run_once: jax.block_until_ready(run_once()), repeats, batch_size, peak)
  return out
