"""What a training step does to its images: the augmentations in order, and the last epochs
without the distortions (`undistorted_final_epochs`)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_augment import keys
from test_eval_views import perturbed

from vit_jax import augment, inference, input_pipeline, steps, train, train_state
from vit_jax.benchmark import step_speed
from vit_jax.experiment_config import ExperimentConfig, validate
from vit_jax.model_configs import get_model_config
from vit_jax.parallel import Runner
from vit_jax.training_images import (
    augmented,
    distortion_end_step,
    training_images,
    undistorted_line,
)


def config(**overrides):
  fields = dict(model=get_model_config("testing"), dataset="fashion_mnist", num_epochs=36,
                augment_max_shift=2, augment_max_rotation=30.0, augment_max_shear=10.0,
                random_erasing=1.0, augment_flip=0.5)
  return ExperimentConfig(**{**fields, **overrides})


def test_the_distortions_end_where_the_last_undistorted_epochs_begin():
  assert distortion_end_step(config(undistorted_final_epochs=6), total_steps=15480) == 12900
  assert distortion_end_step(config(undistorted_final_epochs=36), total_steps=360) == 0
  assert distortion_end_step(config(undistorted_final_epochs=0), total_steps=360) is None
  assert distortion_end_step(config(undistorted_final_epochs=6), total_steps=None) is None
  assert distortion_end_step(config(undistorted_final_epochs=0.001), total_steps=360) is None
  with pytest.raises(ValueError, match=r"undistorted_final_epochs=6.0 must be 0 where no "
                     r"distortion is on \(none of augment_max_rotation, .*random_erasing, "
                     r"mixup_alpha, cutmix_alpha\)"):
    config(undistorted_final_epochs=6, augment_max_rotation=0.0, augment_max_shear=0.0,
           random_erasing=0.0)  # shifts and flips stay: there would be nothing to turn off


def test_the_line_is_said_where_the_undistorted_epochs_begin_or_a_resumed_run_starts():
  run = config(undistorted_final_epochs=6)  # 360 steps: the last 60 undistorted
  said = {step: undistorted_line(run, 360, step, first_step=0) for step in range(360)}
  assert {step for step, line in said.items() if line} == {300}
  assert said[300] == "step 301: the last 6 epochs, without the distortions"
  resumed = [undistorted_line(run, 360, step, first_step=320) for step in range(320, 360)]
  assert resumed[0] == "step 321: the last 6 epochs, without the distortions"
  assert not any(resumed[1:])
  assert undistorted_line(config(), 360, 300, first_step=0) is None


def moved_state(run):
  """A fresh state with its parameters off their initial values (a zero head makes every
  image's loss log 10, whatever the images)."""
  return perturbed(train_state.create_train_state(run, total_steps=16), 0.1, 1)


def step_loss(run, state, step=0):
  """The loss of `run`'s compiled step at `step` on 16 synthetic digits, before its update:
  it sees the images the step makes."""
  data = step_speed.synthetic_digits(run, 16)
  index = np.arange(16, dtype=np.int32)
  step_fn = steps.compile_train_steps(run, Runner("jit"), total_steps=16)
  fresh = jax.tree_util.tree_map(jnp.array, state.replace(step=jnp.asarray(step)))
  one_step = steps.call_indices(lambda _: index, step, 1, run.steps_per_call)
  return float(step_fn(fresh, data, one_step, index, jax.random.PRNGKey(0), 1)[1]["loss"][0])


@pytest.mark.slow
def test_the_compiled_step_switches_at_the_state_s_own_step():
  common = dict(dataset="mnist", augment_flip=0.0, num_epochs=2, batch_size=16)
  runs = {"switching": config(**common, undistorted_final_epochs=1),  # steps 8-15 undistorted
          "distorted": config(**common),
          "without": config(**common, augment_max_rotation=0.0, augment_max_shear=0.0,
                            random_erasing=0.0)}
  state = moved_state(runs["distorted"])

  def loss(name, step):
    return step_loss(runs[name], state, step)

  assert loss("switching", 7) == pytest.approx(loss("distorted", 7), rel=1e-6)
  assert loss("switching", 8) == pytest.approx(loss("without", 8), rel=1e-6)
  assert loss("switching", 15) == pytest.approx(loss("without", 15), rel=1e-6)
  assert loss("switching", 7) != pytest.approx(loss("without", 7), rel=1e-3)


@pytest.mark.parametrize("base,change", [
    ({}, {"augment_max_shift": 2}),
    ({}, {"augment_max_rotation": 30.0}),
    ({}, {"augment_max_scale": 0.3}),
    ({}, {"augment_max_shear": 20.0}),
    ({}, {"augment_elastic_alpha": 34.0}),
    ({"augment_elastic_alpha": 34.0}, {"augment_elastic_sigma": 8.0}),
    ({}, {"random_erasing": 1.0}),
    ({"dataset": "fashion_mnist"}, {"augment_flip": 1.0}),
    ({}, {"label_smoothing": 0.2}),
    ({}, {"dataset": "fashion_mnist"}),  # its own normalisation
], ids=lambda fields: ",".join(fields) or "-")
@pytest.mark.slow
def test_every_field_the_step_reads_changes_its_loss(base, change):
  """A field the compiled step ignored would leave the first loss as it was."""
  plain = config(**{"dataset": "mnist", "augment_max_shift": 0, "augment_max_rotation": 0.0,
                    "augment_max_shear": 0.0, "random_erasing": 0.0, "augment_flip": 0.0,
                    "num_epochs": 2, "batch_size": 16, **base})
  state = moved_state(plain)
  changed = dataclasses.replace(plain, **change)
  assert step_loss(changed, state) != pytest.approx(step_loss(plain, state), rel=1e-4)


@pytest.mark.slow
def test_the_last_epochs_keep_the_shifts_and_flips_and_drop_the_distortions():
  images = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1)).astype(np.uint8)
  run = config(undistorted_final_epochs=6)
  at_step = jax.jit(lambda step: training_images(images, keys(8), step, run, 100))
  distorted, undistorted = np.asarray(at_step(99)), np.asarray(at_step(100))
  # jit and eager round the bilinear sampling differently: grey levels within 1e-2.
  np.testing.assert_allclose(distorted, augmented(images, keys(8), run), atol=1e-2)
  np.testing.assert_array_equal(undistorted, at_step(5000))
  # Undistorted: each image's own shift and flip, the same draws as with the distortions.
  flip_keys = jax.vmap(lambda key: jax.random.fold_in(key, 4))(keys(8))
  shifted = input_pipeline.random_translate(images, keys(8), 2)
  np.testing.assert_array_equal(undistorted, augment.random_flip(shifted, flip_keys, 0.5))
  assert not np.array_equal(distorted, undistorted)
  # Without the field, the step's images are `augmented`'s, the dtype kept where they can be.
  plain = config(augment_max_rotation=0.0, augment_max_shear=0.0, random_erasing=0.0)
  assert training_images(images, keys(8), 0, plain, None).dtype == np.uint8


@pytest.mark.parametrize("value", [-1.0, 37.0])
def test_more_undistorted_epochs_than_the_run_has_is_a_one_line_error(value):
  fields = dataclasses.asdict(config())
  with pytest.raises(ValueError, match=f"config.undistorted_final_epochs={value} must be in "
                                       r"\[0, num_epochs=36.0\]"):
    validate({**fields, "undistorted_final_epochs": value})


@pytest.mark.slow
def test_a_run_undistorted_throughout_trains_as_one_without_distortions(tmp_path, digits,
                                                                        capsys):
  data = {"train": {k: v[:512] for k, v in digits["train"].items()}, "test": digits["test"]}
  common = dict(dataset="mnist", augment_flip=0.0, num_epochs=1, batch_size=64,
                warmup_steps=2, parallel="jit", log_every_steps=4, eval_batch_size=256)
  undistorted = config(**common, undistorted_final_epochs=1)
  without = config(**common, augment_max_rotation=0.0, augment_max_shear=0.0,
                   random_erasing=0.0)
  distorted = config(**common)
  for name, run in (("undistorted", undistorted), ("without", without), ("distorted", distorted)):
    train.train_and_evaluate(run, tmp_path / name, data=data)
    said = capsys.readouterr()
    assert ("step 1: the last 1 epochs, without the distortions" in said.out + said.err) == (
        name == "undistorted")
  params = {name: jax.device_get(inference.restore_state(run, tmp_path / name).params)
            for name, run in (("undistorted", undistorted), ("without", without),
                              ("distorted", distorted))}
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         params["undistorted"], params["without"])
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()),
                                 params["distorted"], params["without"])
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-3
