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
from vit_jax.checkpoints import Checkpoints
from vit_jax.evaluation import Evaluator, view_averaged_log_probabilities
from vit_jax.experiment_config import ExperimentConfig, validate
from vit_jax.parallel import Runner, choose_mode
from vit_jax.train_state import (
  TrainState,
  create_train_state,
  evaluation_params,
  per_array_moments,
)
from vit_jax.workdir import CONFIG_FILE, saved_config, write_or_check_config


def resolved_config(config: Any, workdir: str | Path) -> ExperimentConfig:
  """`config` validated, with its 'auto' choices those of the run in `workdir`."""
  return auto.resolve(validate(config), recorded=saved_config(workdir))[0]


# The fields a trained run's evaluation, predictions, pictures and exports read; the others
# are training's, and changing them there changes nothing.
USED_AFTER_TRAINING = ("eval_batch_size", "eval_max_shift", "eval_flip", "parallel",
                       "tfds_data_dir", "idx_dir", "model.attention_kernel", "model.compute_dtype")


def restore_state(config: Any, workdir: str | Path, one_view: bool = False) -> TrainState:
  """The latest readable checkpoint of `workdir`, its `params` those evaluation uses (the
  moving average, where the run kept one); a clear error if there is none. Reads only: a
  workdir may be read-only (a shipped model). `one_view`: for a use that looks at each image
  itself (pictures, instruments), which says so where the config names test-time views."""
  if not Path(workdir).is_dir():  # not "holds no readable checkpoint": there is no run
    raise ValueError(f"workdir={str(workdir)!r} "
                     f"{'is a file, not a folder' if Path(workdir).exists() else 'does not exist'}")
  config = resolved_config(config, workdir)
  workdir = Path(workdir)
  changed = write_or_check_config(workdir, config, write=False, training=False)  # another
  if unused := [k for k in changed if k not in USED_AFTER_TRAINING]:
    print(f"note: {', '.join(unused)} differ from the run's ({CONFIG_FILE} in {workdir}) and "
          "change nothing here: training reads them", file=sys.stderr)
  views = {k: f"{k}={getattr(config, k)!r}" for k in ("eval_max_shift", "eval_flip")}
  if one_view:
    if config.eval_max_shift or config.eval_flip:
      print(f"note: each image is looked at itself, one view ({', '.join(views.values())} "
            "are evaluation's views)", file=sys.stderr)
  # Another model is refused; other views are allowed, and change the figures: say so.
  elif other_views := [shown for k, shown in views.items() if k in changed]:
    print(f"note: evaluating with {', '.join(other_views)}, not the run's own test-time views "
          f"({CONFIG_FILE} in {workdir})", file=sys.stderr)
  template = create_train_state(config, total_steps=1)
  checkpoints = Checkpoints(workdir, read_only=True)  # nothing is written there
  try:
    state = checkpoints.restore_latest(template, earlier=per_array_moments(template))
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


def probabilities(config: ExperimentConfig, apply_fn, params, images: jax.Array,
                  num_passes: int = 1) -> jax.Array:
  """uint8 (B, H, W, C) images -> class probabilities (B, num_classes), averaged over the
  views of `config.eval_max_shift` and `config.eval_flip` as evaluation averages them;
  `num_passes` as `view_averaged_log_probabilities`'."""
  images = input_pipeline.evaluation_views(images, config.eval_max_shift, config.eval_flip)
  return jnp.exp(view_averaged_log_probabilities(
      apply_fn, params, input_pipeline.normalize(images, config.dataset), num_passes))


def probabilities_in_batches(config: ExperimentConfig, state: TrainState, images: np.ndarray,
                             batch_size: int = 500, progress=None) -> np.ndarray:
  """`probabilities` of many uint8 (N, H, W, C) images -> float32 (N, num_classes), as
  evaluation computes them: batches laid over the devices (`config.parallel`), each device's
  images and their views in cache-sized passes (`auto.eval_images_per_pass`), the last batch
  padded. `batch_size` (at most the images') is rounded up to a multiple of the devices;
  `progress(done, total)` is called after each batch. One process's devices only."""
  runner = Runner(choose_mode(config.parallel))
  if runner.num_processes > 1:  # each process would get its own share of every batch back
    raise ValueError(f"probabilities of images run in one process, not {runner.num_processes}")
  batch_size = -(-min(batch_size, len(images)) // runner.num_devices) * runner.num_devices
  num_passes, _ = input_pipeline.evaluation_passes(
      batch_size // runner.num_devices, config.eval_max_shift, config.eval_flip,
      auto.eval_images_per_pass(config.model))
  step = runner.compile(functools.partial(_probabilities_on_indices, config, state.apply_fn,
                                          num_passes=num_passes), in_axes=(0, 0, 0))
  params, data = runner.replicate(state.params), runner.replicate(images)
  parts = []
  for indices, mask in input_pipeline.eval_indices(len(images), batch_size):
    batch = step(params, data, runner.split_batch(indices))
    parts.append(np.asarray(batch, np.float32).reshape(batch_size, -1)[mask])
    if progress is not None:
      progress(sum(map(len, parts)), len(images))
  return np.concatenate(parts)


def _probabilities_on_indices(config, apply_fn, params, images, indices, *, num_passes,
                              axis_name):
  del axis_name  # each image's probabilities are its own: nothing to share
  return probabilities(config, apply_fn, params, images[indices], num_passes)


def restore_with_test_images(config: Any, workdir: str | Path, num_images: int,
                             test_data: dict[str, np.ndarray] | None = None
                             ) -> tuple[ExperimentConfig, TrainState, np.ndarray, np.ndarray]:
  """(resolved config, restored state, the first `num_images` test images and labels), from
  `test_data` or the dataset: what the pictures and the instruments start from."""
  if num_images < 1:
    raise ValueError(f"num_images={num_images} must be at least 1")
  config = resolved_config(config, workdir)
  state = restore_state(config, workdir, one_view=True)
  if test_data is None:
    images, labels = mnist_source.load_split(config.dataset, "test", config.tfds_data_dir,
                                             config.idx_dir)
  else:
    images, labels = test_data["image"], test_data["label"]
  if num_images > len(labels):  # fewer than asked for would be drawn or measured unsaid
    raise ValueError(f"num_images={num_images} exceeds the {len(labels)} test images of "
                     f"{config.dataset}")
  return config, state, images[:num_images], labels[:num_images]
