"""Using a trained run: its latest state, its test accuracy, its predictions.

Layer 4 of vit_jax.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import auto, input_pipeline, mnist_source
from vit_jax.checkpoints import CONFIG_FILE, Checkpoints, saved_config, write_or_check_config
from vit_jax.experiment_config import ExperimentConfig, validate
from vit_jax.parallel import Runner, choose_mode
from vit_jax.steps import Evaluator, view_averaged_log_probabilities
from vit_jax.train_state import TrainState, create_train_state, evaluation_params


def resolved_config(config: Any, workdir: str | Path) -> ExperimentConfig:
  """`config` validated, with its 'auto' choices those of the run in `workdir`."""
  return auto.resolve(validate(config), recorded=saved_config(workdir))[0]


def restore_state(config: Any, workdir: str | Path) -> TrainState:
  """The latest readable checkpoint of `workdir`, its `params` those evaluation uses (the
  moving average, where the run kept one); a clear error if there is none. Reads only: a
  workdir may be read-only (a shipped model)."""
  config = resolved_config(config, workdir)
  workdir = Path(workdir)
  changed = write_or_check_config(workdir, config, write=False, training=False)  # another
  views = [f"{k}={getattr(config, k)!r}" for k in ("eval_max_shift", "eval_flip") if k in changed]
  if views:  # model is refused; other views are allowed, and change the figures: say so
    print(f"note: evaluating with {', '.join(views)}, not the run's own test-time views "
          f"({CONFIG_FILE} in {workdir})", file=sys.stderr)
  template = create_train_state(config, total_steps=1)
  checkpoints = Checkpoints(workdir, read_only=True)  # nothing is written there
  try:
    state = checkpoints.restore_latest(template)
  finally:
    checkpoints.close()
  if state is None:
    raise ValueError(f"workdir={str(workdir)!r} holds no readable checkpoint")
  return state.replace(params=evaluation_params(state))


def split_evaluator(config: ExperimentConfig, runner: Runner,
                    split: dict[str, np.ndarray]) -> Evaluator:
  """An Evaluator of one held-out split, with the config's batch size and test-time views
  (the one place they are read: training and `--mode=eval` evaluate alike)."""
  return Evaluator(runner, runner.replicate(split), len(split["label"]), config.eval_batch_size,
                   config.dataset, config.eval_max_shift, config.eval_flip,
                   auto.eval_images_per_pass(config.model))


def evaluate_checkpoint(config: Any, workdir: str | Path,
                        data: dict[str, dict[str, np.ndarray]] | None = None) -> dict[str, float]:
  """Test loss and accuracy of the latest checkpoint in `workdir`."""
  config = resolved_config(config, workdir)
  runner = Runner(choose_mode(config.parallel))
  runner.check_batch_size("eval_batch_size", config.eval_batch_size)  # before any loading
  state = restore_state(config, workdir)
  test = data["test"] if data is not None else dict(zip(
      ("image", "label"),
      mnist_source.load_split(config.dataset, "test", config.tfds_data_dir, config.idx_dir),
      strict=True))
  result = split_evaluator(config, runner, test)(runner.replicate(state))
  return {**result, "step": int(state.step)}


def predict(config: Any, workdir: str | Path, images: np.ndarray) -> np.ndarray:
  """Class probabilities (B, num_classes) of uint8 (B, H, W, C) images, latest checkpoint;
  averaged over the views as evaluation averages them (`eval_max_shift`, `eval_flip`)."""
  config = resolved_config(config, workdir)
  state = restore_state(config, workdir)

  return np.asarray(jax.jit(functools.partial(probabilities, config, state.apply_fn))(
      state.params, images))


def probabilities(config: ExperimentConfig, apply_fn, params, images: jax.Array) -> jax.Array:
  """uint8 (B, H, W, C) images -> class probabilities (B, num_classes), averaged over the
  views of `config.eval_max_shift` and `config.eval_flip` as evaluation averages them."""
  images = input_pipeline.evaluation_views(images, config.eval_max_shift, config.eval_flip)
  return jnp.exp(view_averaged_log_probabilities(
      apply_fn, params, input_pipeline.normalize(images, config.dataset)))


def restore_with_test_images(config: Any, workdir: str | Path, num_images: int,
                             test_data: dict[str, np.ndarray] | None = None
                             ) -> tuple[ExperimentConfig, TrainState, np.ndarray, np.ndarray]:
  """(resolved config, restored state, the first `num_images` test images and labels), from
  `test_data` or the dataset: what the pictures and the instruments start from."""
  if num_images < 1:
    raise ValueError(f"num_images={num_images} must be at least 1")
  config = resolved_config(config, workdir)
  state = restore_state(config, workdir)
  if test_data is None:
    images, labels = mnist_source.load_split(config.dataset, "test", config.tfds_data_dir,
                                             config.idx_dir)
  else:
    images, labels = test_data["image"], test_data["label"]
  return config, state, images[:num_images], labels[:num_images]
