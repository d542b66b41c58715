"""A trained run as a TensorFlow SavedModel, for use outside JAX (`launch.py --mode=export`).

The SavedModel's `serving_default` signature takes `images`, uint8 (B, 28, 28, 1) pixels as
the datasets store them, any B, and returns `probabilities` (B, num_classes) and `attention`
(B, num_layers, num_heads, N, N), every layer's attention weights, N = 1 + patches. The
normalisation is inside. The maths is the einsum path (the pure functions) whatever
kernel the run trained with: XLA's CPU kernel plug-in does not travel to TensorFlow.
Converted with `jax2tf` (StableHLO inside the SavedModel, run by TensorFlow's XLA).

Layer 4 of vit_jax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from vit_jax import inference, input_pipeline, models
from vit_jax.evaluation import average_over_views
from vit_jax.experiment_config import ExperimentConfig


def serving_function(config: ExperimentConfig, params: Any) -> Callable[[jax.Array], tuple]:
  """uint8 (B, H, W, C) images -> (probabilities (B, K), attention (B, L, H, N, N)).

  The probabilities are averaged over the run's views (`eval_max_shift`, `eval_flip`), as
  evaluation and `inference.predict` average them; the attention is the image's own, from
  the same forward pass."""
  model = models.ViT(dataclasses.replace(config.model, attention_kernel="einsum"))

  def serve(images):
    views = input_pipeline.evaluation_views(images, config.eval_max_shift, config.eval_flip)
    batch, num_views = views.shape[:2]
    flat = views.reshape(batch * num_views, *views.shape[2:])
    logits, variables = model.apply({"params": params},
                                    input_pipeline.normalize(flat, config.dataset),
                                    mutable=["intermediates"])
    maps = models.attention_maps(variables["intermediates"])  # (L, B * V, H, N, N)
    maps = maps.reshape(maps.shape[0], batch, num_views, *maps.shape[2:])
    own = maps[:, :, input_pipeline.unshifted_view(config.eval_max_shift)]  # (L, B, H, N, N)
    log_probs = average_over_views(logits.reshape(batch, num_views, -1))
    return jnp.exp(log_probs), jnp.moveaxis(own, 0, 1)

  return serve


def export_saved_model(config: Any, workdir: str | Path, out: str | Path | None = None
                       ) -> Path:
  """Writes the latest checkpoint of `workdir` as a SavedModel in `out` (default
  WORKDIR/saved_model), replacing what was there only once the new one is complete."""
  out = Path(out) if out is not None else Path(workdir) / "saved_model"
  if out.exists() and not (out.is_dir() and (_is_saved_model(out) or not any(out.iterdir()))):
    raise ValueError(f"output_dir={str(out)!r} exists and is not a SavedModel, which export "
                     "would replace; name a new folder")
  import tensorflow as tf
  from jax.experimental import jax2tf

  config = inference.resolved_config(config, workdir)
  params = inference.restore_state(config, workdir).params
  c = config.model
  converted = jax2tf.convert(serving_function(config, params), with_gradient=False,
                             polymorphic_shapes=[f"(b, {c.image_size}, {c.image_size}, "
                                                 f"{c.num_channels})"])
  spec = tf.TensorSpec([None, c.image_size, c.image_size, c.num_channels], tf.uint8,
                       name="images")

  @tf.function(input_signature=[spec], autograph=False)
  def serving_default(images):
    probabilities, attention = converted(images)
    return {"probabilities": probabilities, "attention": attention}

  module = tf.Module()
  module.serving_default = serving_default
  out.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  replaced = staging.with_name(staging.name + ".replaced")
  try:
    with _absl_says_warnings_only():
      tf.saved_model.save(module, str(staging), signatures={"serving_default": serving_default})
    if out.exists():  # moved aside, not deleted, until the new one is in place
      out.rename(replaced)
    try:
      staging.rename(out)
    except OSError:
      if replaced.exists():
        replaced.rename(out)  # the old export back where it was
      raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(replaced, ignore_errors=True)
  return out


def _is_saved_model(folder: Path) -> bool:
  return (folder / "saved_model.pb").is_file()


@contextlib.contextmanager
def _absl_says_warnings_only():
  """TensorFlow's SavedModel writer sets absl's verbosity back to its flag's value (INFO) as it
  goes, and logs each file it writes: the flag itself says WARNING meanwhile."""
  from absl import logging as absl_logging

  verbosity = absl_logging.get_verbosity()
  levels = {name: logging.getLogger(name).level for name in ("absl", "")}  # "": the root
  absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    yield
  finally:
    absl_logging.set_verbosity(verbosity)
    for name, level in levels.items():
      logging.getLogger(name).setLevel(level)
