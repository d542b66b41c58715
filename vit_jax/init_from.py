"""Fine-tuning: a run's first parameters taken from another run (`config.init_from`).

What can be carried over is carried over, and the rest said in one line:
- the classifier head is re-initialised when the classes differ or `config.reinit_head`;
- for another patch size (another patch grid), the position embeddings are resampled and
  the patch projection resized (`vit_jax.resample`);
- a different width, depth, MLP, projection mode or patch overlap cannot be mapped: a
  one-line error. With overlapping patches the whole window is resized, so a resized
  projection reproduces the source's tokens only approximately.
The source's evaluation parameters (its moving average, where it kept one) are the ones taken.

Layer 4 of vit_jax.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import traverse_util

from vit_jax import inference, resample
from vit_jax.experiment_config import ExperimentConfig, validate
from vit_jax.model_configs import ModelConfig
from vit_jax.workdir import read_config

# Model fields that must agree for the parameters to map one to one. The others may differ:
# patch_size (resampled), num_classes (the head re-initialised), num_heads (the same matrices
# split otherwise), dropout, drop path, compute dtype and attention kernel (no parameters).
MUST_MATCH = ("hidden_size", "num_layers", "mlp_dim", "qkv", "qkv_bias", "classifier",
              "image_size", "num_channels", "patch_overlap")


def source_run(workdir: str | Path) -> tuple[ExperimentConfig, Any, int]:
  """The run in `workdir`: (its config, the parameters it evaluates with, their step)."""
  config = validate(read_config(workdir))
  state = inference.restore_state(config, workdir)
  return config, state.params, int(state.step)


def check_source(config: ExperimentConfig) -> None:
  """Refuses, in one line and before anything is written, a source that cannot be mapped."""
  try:
    source = validate(read_config(config.init_from))
  except ValueError as e:
    raise ValueError(f"config.init_from={config.init_from!r}: {e}") from None
  check_mappable(source.model, config.model, config.init_from)
  # A run holds out the first N images of one fixed order: a source that held out fewer
  # trained on some of this run's held-out images.
  if source.dataset == config.dataset and \
      source.validation_examples < config.validation_examples:
    raise ValueError(f"config.init_from={config.init_from!r} held out "
                     f"{source.validation_examples} images and trained on the rest: "
                     f"config.validation_examples={config.validation_examples} would hold out "
                     "images it trained on; hold out at most as many as the source did")


# qkv='low_rank' factors its projections per head, at its rank: (D, H r) and (H, r, D/H).
LOW_RANK_MUST_MATCH = ("qkv_rank", "num_heads")


def check_mappable(source: ModelConfig, target: ModelConfig, workdir: str) -> None:
  low_rank = target.qkv == "low_rank"
  for key in MUST_MATCH + (LOW_RANK_MUST_MATCH if low_rank else ()):
    if getattr(source, key) != getattr(target, key):
      raise ValueError(
          f"config.init_from={workdir!r}: its model.{key}={getattr(source, key)!r} differs "
          f"from model.{key}={getattr(target, key)!r}; only the patch size, the classes and "
          + ("(not for qkv='low_rank') " if low_rank else "") + "the head count may differ")


def transfer(source_params: Any, target_params: Any, source: ModelConfig, target: ModelConfig,
             reinit_head: bool) -> tuple[Any, list[str]]:
  """-> (`target_params` with every mappable parameter taken from the source, what changed).

  Both trees must come from models that pass `check_mappable`.
  """
  flat_source = traverse_util.flatten_dict(source_params, sep="/")
  flat_target = traverse_util.flatten_dict(target_params, sep="/")
  notes = []
  keep_head = not reinit_head and source.num_classes == target.num_classes
  if not keep_head:
    notes.append("the classifier head re-initialised")
  out = {}
  for path, fresh in flat_target.items():
    value = flat_source[path]
    if path.startswith("head/") and not keep_head:
      value = fresh
    elif path == "pos_embedding" and value.shape != fresh.shape:
      value = resample.resample_position_embedding(
          value, target.image_size // target.patch_size,
          num_prefix=int(target.classifier == "token"))
      notes.append(f"position embeddings resampled to {fresh.shape[1]} tokens")
    elif path == "patch_embedding/projection/kernel" and value.shape != fresh.shape:
      old, new = source.patch_window, target.patch_window
      value = resample.resize_patch_kernel(value, old, new, target.num_channels)
      notes.append(f"patch projection resized from {old}x{old} to {new}x{new}")
    if value.shape != fresh.shape:  # a pair `check_mappable` let through by mistake
      raise ValueError(f"config.init_from: its parameter {path} is {value.shape}, this "
                       f"model's {fresh.shape}")
    out[path] = jnp.asarray(value, fresh.dtype)
  return traverse_util.unflatten_dict(out, sep="/"), notes


def initialised_from(state: Any, config: ExperimentConfig) -> tuple[Any, str]:
  """`state` (fresh) with its parameters, and moving average, taken from `config.init_from`.

  -> (the state, a line saying what was taken).
  """
  source_config, source_params, step = source_run(config.init_from)
  check_mappable(source_config.model, config.model, config.init_from)
  params, notes = transfer(source_params, state.params, source_config.model, config.model,
                           config.reinit_head)
  replaced = {"params": params}
  if "ema_params" in {f.name for f in dataclasses.fields(state)}:
    replaced["ema_params"] = params
  state = state.replace(**replaced, opt_state=state.tx.init(params))
  detail = "; ".join(notes) if notes else "every parameter as it was"
  return state, f"parameters from {config.init_from} (step {step}): {detail}"
