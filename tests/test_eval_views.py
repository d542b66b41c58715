"""Test-time augmentation: evaluation and prediction averaging over shifted and mirrored
views."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import auto, evaluation, inference, input_pipeline, steps, train, train_state
from vit_jax.experiment_config import ExperimentConfig
from vit_jax.model_configs import get_model_config
from vit_jax.parallel import Runner


def shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """Reference: `image` (H, W, C) moved down dy and right dx pixels, zeros coming in."""
  out = np.zeros_like(image)
  h, w = image.shape[:2]
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
      image[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
  return out


def test_the_views_are_every_shift_zero_filled_with_the_image_itself_in_the_middle():
  images = np.random.default_rng(0).integers(1, 256, (3, 6, 7, 1)).astype(np.uint8)
  views = np.asarray(input_pipeline.shifted_views(jnp.asarray(images), 2))
  assert views.shape == (3, 25, 6, 7, 1)  # batch first: a device's images keep their views
  np.testing.assert_array_equal(views[:, 12], images)
  expected = {shifted(images[1], dy, dx).tobytes()
              for dy in range(-2, 3) for dx in range(-2, 3)}
  assert {v.tobytes() for v in views[1]} == expected  # 25 distinct shifts, none missing
  np.testing.assert_array_equal(input_pipeline.shifted_views(jnp.asarray(images), 0)[:, 0],
                                images)


def test_the_views_are_what_training_draws_its_random_shifts_from():
  image = np.random.default_rng(1).integers(1, 256, (1, 8, 8, 1)).astype(np.uint8)
  views = {v.tobytes() for v in np.asarray(input_pipeline.shifted_views(jnp.asarray(image), 1))[0]}
  keys = jax.random.split(jax.random.PRNGKey(0), 64)
  drawn = np.asarray(input_pipeline.random_translate(jnp.repeat(image, 64, 0), keys, 1))
  assert {d.tobytes() for d in drawn} == views  # 64 draws cover all 9 shifts


def test_negative_shifts_are_refused():
  with pytest.raises(ValueError, match="max_shift=-1 must not be negative"):
    input_pipeline.shifted_views(jnp.zeros((1, 4, 4, 1)), -1)


def test_flipped_views_follow_the_views_each_mirrored_left_to_right():
  images = np.random.default_rng(4).integers(1, 256, (2, 5, 6, 1)).astype(np.uint8)
  views = np.asarray(input_pipeline.evaluation_views(jnp.asarray(images), 1, flip=True))
  assert views.shape == (2, 18, 5, 6, 1)
  shifts = np.asarray(input_pipeline.shifted_views(jnp.asarray(images), 1))
  np.testing.assert_array_equal(views[:, :9], shifts)
  np.testing.assert_array_equal(views[:, 9:], shifts[:, :, :, ::-1])
  np.testing.assert_array_equal(views[:, 13, :, ::-1], images)  # the middle one, mirrored
  alone = input_pipeline.evaluation_views(jnp.asarray(images), 0, flip=False)
  np.testing.assert_array_equal(alone, images[:, None])


def linear_model(variables, images, train=False):
  """A stand-in model: logits = flattened image @ weights."""
  return images.reshape(images.shape[0], -1) @ variables["params"]


def test_averaging_is_the_log_of_the_mean_probability_and_one_view_is_plain_softmax():
  rng = np.random.default_rng(2)
  weights = rng.normal(size=(12, 5)).astype(np.float32)
  views = rng.normal(size=(4, 3, 2, 2, 3)).astype(np.float32)  # 4 images, 3 views each
  got = evaluation.view_averaged_log_probabilities(linear_model, weights, jnp.asarray(views))
  logits = views.reshape(4, 3, 12) @ weights
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(np.exp(got), probs.mean(1), rtol=1e-5, atol=1e-7)
  one = evaluation.view_averaged_log_probabilities(linear_model, weights, jnp.asarray(views[:, 0]))
  np.testing.assert_allclose(one, jax.nn.log_softmax(logits[:, 0]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_images,num_views,num_passes", [(4, 3, 3), (4, 3, 2), (4, 3, 1)])
def test_passes_of_a_few_images_give_the_one_pass_result(num_images, num_views, num_passes):
  rng = np.random.default_rng(3)
  weights = rng.normal(size=(12, 5)).astype(np.float32)
  views = jnp.asarray(rng.normal(size=(num_images, num_views, 2, 2, 3)).astype(np.float32))
  whole = evaluation.view_averaged_log_probabilities(linear_model, weights, views)
  seen = []

  def counting_model(variables, images, train=False):
    seen.append(images.shape[0])
    return linear_model(variables, images, train)

  got = evaluation.view_averaged_log_probabilities(counting_model, weights, views, num_passes)
  np.testing.assert_allclose(got, whole, rtol=1e-6, atol=1e-6)  # every image back in place
  assert seen == [num_images * num_views // num_passes]  # traced once: lax.map's body


@pytest.mark.parametrize("total,fits,part", [
    (12, 4, 4), (12, 5, 4), (12, 7, 6), (12, 12, 12), (12, 20, 12),
    (13, 8, 13),     # prime: passes of one are under a quarter of 8, and 13 <= 8 x 8
    (101, 8, 1),     # but a share over 8 times what fits takes them
])
def test_a_cache_sized_part_is_the_largest_divisor_that_fits_unless_too_small(total, fits, part):
  assert input_pipeline.cache_sized_part(total, fits) == part


def perturbed(state, scale: float, seed: int):
  """`state` with noise of std `scale` on every parameter: a fresh model's zero-initialised
  head gives every class the same probability, whatever its input."""
  leaves, tree = jax.tree_util.tree_flatten(state.params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  noisy = [leaf + scale * jax.random.normal(key, leaf.shape)
           for leaf, key in zip(leaves, keys, strict=True)]
  return state.replace(params=jax.tree_util.tree_unflatten(tree, noisy))


def untrained_state():
  """A `testing` ViT whose parameters are all perturbed."""
  return perturbed(train_state.create_train_state(
      ExperimentConfig(model=get_model_config("testing"), parallel="jit"), total_steps=1), 0.2, 3)


@pytest.mark.slow
def test_one_view_evaluates_as_plain_cross_entropy(digits):
  state = untrained_state()
  images = input_pipeline.normalize(jnp.asarray(digits["test"]["image"][:32]), "mnist")
  labels = jnp.asarray(digits["test"]["label"][:32])
  sums = evaluation.eval_step(state, {"image": images, "label": labels, "mask": jnp.ones(32, bool)})
  logits = state.apply_fn({"params": state.params}, images, train=False)
  np.testing.assert_allclose(sums["loss"], jnp.sum(steps.cross_entropy(logits, labels)),
                             rtol=1e-5)
  assert sums["correct"] == jnp.sum(jnp.argmax(logits, -1) == labels)


def averaged_reference(state, views, dataset):
  """The model on each batch of `views` separately, its probabilities averaged."""
  apply = jax.jit(lambda x: jax.nn.softmax(state.apply_fn({"params": state.params}, x)))
  return np.mean([apply(input_pipeline.normalize(x, dataset)) for x in views], axis=0)


def nine_view_reference(state, images):
  """The model on each copy of `images` shifted by up to a pixel, probabilities averaged."""
  return averaged_reference(state, [np.stack([shifted(im, dy, dx) for im in images])
                                    for dy in (-1, 0, 1) for dx in (-1, 0, 1)], "mnist")


def mirrored_reference(state, images):
  """The model on `images` and on their mirror images, probabilities averaged."""
  return averaged_reference(state, [images, images[:, :, ::-1]], "fashion_mnist")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_evaluation_and_prediction_average_each_image_with_its_mirror(mode, digits):
  state = untrained_state()
  images, labels = digits["test"]["image"][:40], digits["test"]["label"][:40]
  runner = Runner(mode)
  config = ExperimentConfig(model=get_model_config("testing"), dataset="fashion_mnist",
                            eval_flip=True, eval_batch_size=16)
  # The evaluator as every evaluation builds it, from the config's fields.
  result = inference.split_evaluator(config, runner, {"image": images, "label": labels})(
      runner.replicate(state))
  probs = mirrored_reference(state, images)
  assert result["eval_loss"] == pytest.approx(
      -np.mean(np.log(probs[np.arange(40), labels])), rel=1e-4)
  assert result["eval_accuracy"] == pytest.approx(np.mean(probs.argmax(-1) == labels))
  predicted = inference.probabilities(config, state.apply_fn, state.params, images[:12])
  np.testing.assert_allclose(predicted, probs[:12], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["jit", "pmap", "shard"])
def test_evaluation_passes_take_a_device_s_share_and_leave_the_result(mode, digits):
  # Each device's 2 examples x 9 views = 18 images, in passes of up to 4: 3 divides 18.
  state = untrained_state()
  runner = Runner(mode)
  examples = 2 * runner.num_devices
  images, labels = digits["test"]["image"][:examples], digits["test"]["label"][:examples]
  held = runner.replicate({"image": images, "label": labels})
  whole = evaluation.Evaluator(runner, held, examples, examples, "mnist", max_shift=1)
  passes = evaluation.Evaluator(runner, held, examples, examples, "mnist", max_shift=1,
                           images_per_pass=4)
  assert (whole.num_passes, whole.device_images_per_pass) == (1, 18)  # 2 examples x 9 views
  assert (passes.num_passes, passes.device_images_per_pass) == (6, 3)  # 3 divides 18
  replicated = runner.replicate(state)
  got, expected = passes(replicated), whole(replicated)
  assert got["eval_accuracy"] == expected["eval_accuracy"]
  assert got["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)


def test_test_time_flips_are_refused_for_digits():
  with pytest.raises(ValueError, match="eval_flip=True must be False for mnist"):
    ExperimentConfig(model=get_model_config("testing"), eval_flip=True)


@pytest.mark.parametrize("mode", ["jit", "pmap", "shard"])
def test_evaluation_averages_the_nine_views_on_any_devices(mode, digits):
  state = untrained_state()
  images, labels = digits["test"]["image"][:40], digits["test"]["label"][:40]
  runner = Runner(mode)
  held = runner.replicate({"image": images, "label": labels})
  result = evaluation.Evaluator(runner, held, 40, 16, "mnist", max_shift=1)(runner.replicate(state))
  probs = nine_view_reference(state, images)
  assert result["eval_accuracy"] == pytest.approx(np.mean(probs.argmax(-1) == labels))
  assert result["eval_loss"] == pytest.approx(
      -np.mean(np.log(probs[np.arange(40), labels])), rel=1e-4)
  plain = evaluation.Evaluator(runner, held, 40, 16, "mnist")(runner.replicate(state))
  assert plain["eval_loss"] != pytest.approx(result["eval_loss"], rel=1e-4)


@pytest.mark.parametrize("fits", [4, 0])
@pytest.mark.parametrize("parallel", ["jit", "pmap", "shard"])
def test_probabilities_in_batches_are_each_image_s_own_on_any_devices(parallel, fits, digits,
                                                                      monkeypatch):
  # 13 images in batches of 12 (jit; the second padded) or one padded batch of 16 (12 rounded
  # up to the 8 devices: 2 images each). A device's images x 9 views in passes of up to 4
  # (108 in 27 passes, 18 in 6), or where nothing is said to fit (a GPU's 0) in one pass.
  monkeypatch.setattr(auto, "eval_images_per_pass", lambda model: fits)
  state = untrained_state()
  config = ExperimentConfig(model=get_model_config("testing"), eval_max_shift=1,
                            parallel=parallel)
  images = digits["test"]["image"][:13]
  calls = []
  probs = inference.probabilities_in_batches(config, state, images, batch_size=12,
                                             progress=lambda *done: calls.append(done))
  assert probs.dtype == np.float32 and probs.shape == (13, 10)
  np.testing.assert_allclose(probs, nine_view_reference(state, images), rtol=1e-4, atol=1e-6)
  assert calls == ([(12, 13), (13, 13)] if parallel == "jit" else [(13, 13)])


def test_probabilities_in_batches_refuse_several_processes(digits, monkeypatch):
  state = untrained_state()
  monkeypatch.setattr(jax, "process_count", lambda: 2)  # a second host's share would be lost
  config = ExperimentConfig(model=get_model_config("testing"), parallel="pmap")
  with pytest.raises(ValueError, match="^probabilities of images run in one process, not 2$"):
    inference.probabilities_in_batches(config, state, digits["test"]["image"][:4])


@pytest.mark.slow
def test_prediction_averages_the_nine_views(digits):
  state = untrained_state()
  config = ExperimentConfig(model=get_model_config("testing"), eval_max_shift=1)
  images = digits["test"]["image"][:12]
  probs = inference.probabilities(config, state.apply_fn, state.params, images)
  np.testing.assert_allclose(probs, nine_view_reference(state, images), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_run_evaluates_and_predicts_with_the_views_its_config_names(tmp_path, digits,
                                                                      capsys):
  config = ExperimentConfig(model=get_model_config("testing"), parallel="jit", batch_size=64,
                            num_epochs=0.25, augment_max_shift=0, eval_max_shift=1,
                            eval_batch_size=128)
  data = {"train": digits["train"], "test": digits["test"]}
  result = train.train_and_evaluate(config, tmp_path, data=data)
  again = inference.evaluate_checkpoint(config, tmp_path, data=data)
  assert again["eval_accuracy"] == pytest.approx(result["eval_accuracy"], abs=1e-6)
  probs = inference.predict(config, tmp_path, digits["test"]["image"])
  labels = digits["test"]["label"]
  assert np.mean(probs.argmax(-1) == labels) == pytest.approx(result["eval_accuracy"], abs=1e-6)
  assert -np.mean(np.log(probs[np.arange(len(labels)), labels])) == pytest.approx(
      result["eval_loss"], rel=1e-4)
  # The views can be changed when evaluating a finished run: they are not the model's.
  plain = inference.evaluate_checkpoint(
      ExperimentConfig(**{**config.__dict__, "eval_max_shift": 0}), tmp_path, data=data)
  assert plain["eval_loss"] != pytest.approx(result["eval_loss"], rel=1e-4)
  assert "note: evaluating with eval_max_shift=0, not the run's own" in capsys.readouterr().err
  # Training's settings change nothing in a trained run: said, not silently dropped.
  inference.evaluate_checkpoint(ExperimentConfig(**{**config.__dict__, "num_epochs": 3,
                                                    "seed": 4}), tmp_path, data=data)
  assert (f"note: num_epochs, seed differ from the run's (config.json in {tmp_path}) and change "
          "nothing here: training reads them") in capsys.readouterr().err
  # The pictures and instruments look at each image itself, and say so.
  inference.restore_with_test_images(config, tmp_path, 2, test_data=digits["test"])
  assert ("note: each image is looked at itself, one view (eval_max_shift=1, eval_flip=False "
          "are evaluation's views)") in capsys.readouterr().err


@pytest.mark.parametrize("value", [-1, 5])
def test_an_impossible_number_of_views_is_a_one_line_error(value):
  with pytest.raises(ValueError, match=rf"eval_max_shift={value} must be in \[0, 4\]"):
    ExperimentConfig(model=get_model_config("testing"), eval_max_shift=value)


def test_evaluating_with_a_batch_the_devices_cannot_share_is_one_line(tmp_path):
  # 8 devices (conftest); said before any checkpoint or dataset is read, as training says it.
  config = ExperimentConfig(model=get_model_config("testing"), parallel="pmap",
                            eval_batch_size=100)
  with pytest.raises(ValueError, match=r"config.eval_batch_size=100 is not divisible by the "
                                       r"8 devices"):
    inference.evaluate_checkpoint(config, tmp_path)
