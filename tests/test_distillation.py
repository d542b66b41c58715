"""Knowledge distillation: a teacher's probabilities as a share of each training target, the
file that carries them, and a student that learns what its teacher says."""

import dataclasses
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO
from test_train import small_config, subset

from vit_jax import distillation, inference, input_pipeline, steps, train, train_state
from vit_jax.experiment_config import ExperimentConfig
from vit_jax.training_images import training_batch

onehot = functools.partial(jax.nn.one_hot, num_classes=10)


def distilled(**overrides) -> ExperimentConfig:
  return small_config(distill_targets="teachers.npz", distill_weight=0.3, **overrides)


def test_the_training_targets_are_the_label_and_the_teacher_in_their_shares():
  data = {"image": jnp.zeros((8, 28, 28, 1), jnp.uint8), "label": jnp.arange(8) % 10,
          "teacher": jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(0), (8, 10)))}
  indices = jnp.array([5, 2, 7, 0])
  keys = input_pipeline.example_keys(jax.random.PRNGKey(0), np.arange(4))
  batch = training_batch(data, indices, keys, 0, distilled(augment_max_shift=0), None)
  np.testing.assert_array_equal(batch["label"], [5, 2, 7, 0])
  expected = 0.7 * onehot(data["label"][indices]) + 0.3 * data["teacher"][indices]
  np.testing.assert_allclose(batch["target"], expected, rtol=1e-6)
  assert "target" not in training_batch(data, indices, keys, 0, small_config(), None)


def model_and_images():
  state = train_state.create_train_state(small_config(), total_steps=10)
  # The head starts at zero, which would make every target's loss log(10): give it weights.
  head = jax.random.normal(jax.random.PRNGKey(1), state.params["head"]["kernel"].shape)
  state = state.replace(params={**state.params, "head": {**state.params["head"], "kernel": head}})
  return state, jax.random.uniform(jax.random.PRNGKey(2), (6, 28, 28, 1))


def test_a_distilled_batch_s_loss_is_the_cross_entropy_of_its_targets():
  state, x = model_and_images()
  labels = jnp.array([0, 1, 2, 3, 4, 5])
  targets = jax.nn.softmax(3 * jax.random.normal(jax.random.PRNGKey(3), (6, 10)))
  step = jax.jit(functools.partial(steps.train_step, label_smoothing=0.1))
  _, metrics = step(state, {"image": x, "label": labels, "target": targets},
                    jax.random.PRNGKey(0))
  logits = state.apply_fn({"params": state.params}, x, train=True,
                          rngs={"dropout": jax.random.PRNGKey(0)})
  expected = optax.softmax_cross_entropy(logits, optax.smooth_labels(targets, 0.1)).mean()
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  _, plain = step(state, {"image": x, "label": labels}, jax.random.PRNGKey(0))
  assert abs(float(plain["loss"]) - float(metrics["loss"])) > 1e-3


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_a_teacher_that_says_the_labels_changes_nothing(label_smoothing):
  state, x = model_and_images()
  labels = jnp.array([3, 1, 4, 1, 5, 9])
  step = jax.jit(functools.partial(steps.train_step, label_smoothing=label_smoothing))
  taught, taught_metrics = step(state, {"image": x, "label": labels, "target": onehot(labels)},
                                jax.random.PRNGKey(0))
  plain, plain_metrics = step(state, {"image": x, "label": labels}, jax.random.PRNGKey(0))
  np.testing.assert_allclose(taught_metrics["loss"], plain_metrics["loss"], rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(taught.params),
                  jax.tree_util.tree_leaves(plain.params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("overrides, message", [
    (dict(distill_targets="t.npz", distill_weight=1.5),
     r"^distill_weight=1.5 must be in \[0, 1\]$"),
    (dict(distill_weight=0.5), r"^distill_weight=0.5 must be positive exactly where "
                               r"distill_targets is set \(it is None\)$"),
    (dict(distill_targets="t.npz"), r"^distill_weight=0.0 must be positive exactly where "
                                    r"distill_targets is set \(it is 't.npz'\)$"),
    (dict(distill_targets="t.npz", distill_weight=0.5, mixup_alpha=0.2),
     r"^distill_weight=0.5 cannot be combined with mixup_alpha or cutmix_alpha"),
])
def test_a_bad_distillation_config_is_one_line_naming_the_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    small_config(**overrides)


def five_images(order=(0, 1, 2, 3, 4)):
  """Five uint8 images, image i all grey level 10 i, in `order`."""
  return np.broadcast_to((10 * np.asarray(order, np.uint8))[:, None, None, None], (len(order),
                                                                                  28, 28, 1))


def targets_file(path, images, labels, probabilities=None, dataset="mnist", held_out=0):
  probabilities = onehot(labels) if probabilities is None else probabilities
  distillation.save_targets(path, np.asarray(probabilities), images, labels, dataset,
                            ["runs/a"], held_out)
  return path


def test_targets_read_back_as_written(tmp_path):
  labels = np.array([3, 1, 4, 1, 5], np.int32)
  probabilities = np.asarray(jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(0), (5, 10))))
  path = targets_file(tmp_path / "t.npz", five_images(), labels, probabilities, held_out=2)
  for validation_examples in (0, 2):
    np.testing.assert_array_equal(distillation.load_targets(
        path, "mnist", five_images(), labels, 10, validation_examples), probabilities)
  assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]  # no partial file left beside it


@pytest.mark.parametrize("case, message", [
    ("missing", r"does not exist \(experiments/teacher_targets.py writes one\)$"),
    ("not npz", r"is not a file of teacher targets"),
    ("dataset", r"holds fashion_mnist's targets, not mnist's$"),
    ("labels", r"was computed for other images: its 5 are not mnist's 5 training images, in "
               r"order$"),
    ("images", r"was computed for other images: its 5 are not mnist's 5 training images"),
    ("count", r"was computed for other images: its 4 are not mnist's 5 training images"),
    ("classes", r"holds probabilities of shape \(5, 9\), not of shape \(5, 10\)$"),
    ("not probabilities", r"holds rows that are not probabilities"),
    ("held out", r"comes from teachers that held out 2 training images: they trained on some "
                 r"of the 3 this run holds out \(config.validation_examples\)$"),
])
def test_a_file_of_other_targets_is_refused_in_one_line(tmp_path, case, message):
  labels = np.array([3, 1, 4, 1, 5], np.int32)
  path = tmp_path / "t.npz"
  if case == "not npz":
    path.write_text("not an npz")
  elif case != "missing":
    written_labels = {"labels": labels[::-1], "count": labels[:4]}.get(case, labels)
    images = five_images({"images": (0, 1, 2, 4, 3), "count": (0, 1, 2, 3)}.get(
        case, (0, 1, 2, 3, 4)))
    probabilities = {"classes": np.full((5, 9), 1 / 9),
                     "not probabilities": np.full((5, 10), 0.2)}.get(case)
    targets_file(path, images, written_labels, probabilities,
                 "fashion_mnist" if case == "dataset" else "mnist", held_out=2)
  with pytest.raises(ValueError, match=rf"^config.distill_targets='{path}' " + message):
    distillation.load_targets(path, "mnist", five_images(), labels, 10, 3 if case == "held out"
                              else 0)


@pytest.mark.parametrize("teacher, message", [
    (None, r"holds probabilities of none, not of shape \(1024, 10\)$"),
    (np.full((1000, 10), 0.1), r"holds probabilities of shape \(1000, 10\), not of shape "),
    (np.full((1024, 10), 0.2), r"holds rows that are not probabilities"),
])
def test_a_run_handed_data_without_the_teacher_s_rows_is_refused(tmp_path, digits, teacher,
                                                                 message):
  from vit_jax import seeds

  data = subset(digits, 1024)
  if teacher is not None:
    data["train"]["teacher"] = teacher
  expected = r"^config.distill_weight=0.3: data\['train'\]\['teacher'\] " + message
  with pytest.raises(ValueError, match=expected):
    train.train_and_evaluate(distilled(), tmp_path / "run", data=data)
  with pytest.raises(ValueError, match=expected):
    seeds.train_and_evaluate_seeds(distilled(), [0, 1], tmp_path / "group",
                                   [tmp_path / "s0", tmp_path / "s1"], data=data)


@pytest.mark.slow
def test_a_student_learns_what_its_teacher_says_not_the_labels(tmp_path, digits):
  """At weight 1 the labels are not used: a teacher that names the next class for every
  image makes a student that does so too (its test accuracy against the labels near 0)."""
  data = subset(digits, 1024)
  data["train"]["teacher"] = np.asarray(onehot((data["train"]["label"] + 1) % 10))
  config = small_config(distill_targets="t.npz", distill_weight=1.0, augment_max_shift=0,
                        num_epochs=3)
  result = train.train_and_evaluate(config, tmp_path / "run", data=data)
  probabilities = inference.predict(config, tmp_path / "run", data["test"]["image"])
  assert result["eval_accuracy"] < 0.1
  assert np.mean(probabilities.argmax(-1) == (data["test"]["label"] + 1) % 10) > 0.8


def numbered(n):
  """Image i of a split shows i in its first two pixels (i = 256 p0 + p1); label i % 10."""
  images = np.zeros((n, 28, 28, 1), np.uint8)
  images[:, 0, 0, 0], images[:, 0, 1, 0] = np.arange(n) // 256, np.arange(n) % 256
  return images, (np.arange(n) % 10).astype(np.int32)


def test_the_teacher_s_rows_follow_their_images_through_the_hold_out(tmp_path, monkeypatch):
  """Row i of the file names image i's class by its index (i % 7): after the hold-out and
  the cut to train_examples, each training image still has its own row."""
  from vit_jax import mnist_source

  sizes = {"train": 60000, "test": 10000}
  monkeypatch.setattr(mnist_source, "load_split", lambda dataset, split, *dirs: numbered(
      sizes[split]))
  images, labels = numbered(60000)
  path = targets_file(tmp_path / "t.npz", images, labels, onehot(np.arange(60000) % 7),
                      held_out=5000)
  config = small_config(distill_targets=str(path), distill_weight=0.5, train_examples=1000,
                        validation_examples=5000)
  data = train.load_data(config)
  assert "teacher" not in data["validation"] and len(data["train"]["teacher"]) == 1000
  index = 256 * data["train"]["image"][:, 0, 0, 0].astype(int) + data["train"]["image"][:, 0, 1, 0]
  assert len(set(index)) == 1000
  np.testing.assert_array_equal(data["train"]["teacher"].argmax(-1), index % 7)
  with pytest.raises(ValueError, match="held out 5000 training images: they trained on some "
                                       "of the 6000 this run holds out"):
    train.load_data(dataclasses.replace(config, validation_examples=6000))


def test_the_benchmark_s_synthetic_data_carries_a_teacher_where_the_config_distils():
  from vit_jax.benchmark import step_speed

  assert "teacher" not in step_speed.synthetic_digits(small_config(), 16)
  data = step_speed.synthetic_digits(distilled(), 16)
  distillation.check_teacher(distilled(), data)


@pytest.mark.slow
def test_the_teachers_targets_are_the_mean_of_their_predictions(tmp_path, digits):
  data = subset(digits, 256)
  shifts = {"a": 0, "b": 1}  # b averages 9 shifted views of each image
  for name, shift in shifts.items():  # two teachers of other seeds
    train.train_and_evaluate(small_config(seed=ord(name), eval_max_shift=shift), tmp_path / name,
                             data=data)
  images = data["train"]["image"][:40]
  teachers = [tmp_path / "a", tmp_path / "b"]

  def predictions(shift_of_b):
    return [inference.predict(small_config(eval_max_shift=shift_of_b if n == "b" else 0),
                              tmp_path / n, images) for n in shifts]

  own, one = predictions(1), predictions(0)
  np.testing.assert_allclose(distillation.teacher_targets(teachers, images, batch_size=16),
                             (own[0] + own[1]) / 2, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(
      distillation.teacher_targets(teachers, images, batch_size=16, one_view=True),
      (one[0] + one[1]) / 2, rtol=1e-5, atol=1e-7)
  assert not np.allclose(own[0], own[1]) and not np.allclose(own[1], one[1])


@pytest.mark.parametrize("flag, message", [
    ("--cpu_devices=0", "error: --cpu_devices='0' must be 'auto' or a positive integer"),
    ("--batch_size=0", "error: --batch_size=0 must be positive")])
def test_the_command_refuses_a_bad_value_in_one_line(tmp_path, flag, message):
  environment = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # it would win
  done = subprocess.run([sys.executable, "experiments/teacher_targets.py",
                         f"--teachers={tmp_path}", f"--out={tmp_path / 'targets.npz'}", flag],
                        cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
  assert (done.returncode, done.stderr.strip()) == (2, message)
  assert not (tmp_path / "targets.npz").exists()


@pytest.mark.slow
def test_the_command_writes_a_file_a_run_reads(tmp_path, digits, mnist, tfds_dir):
  teacher = tmp_path / "teacher"
  train.train_and_evaluate(small_config(tfds_data_dir=tfds_dir, idx_dir=None), teacher,
                           data=subset(digits, 256))
  out = tmp_path / "targets.npz"
  done = subprocess.run([sys.executable, "experiments/teacher_targets.py",
                         f"--teachers={teacher}", f"--out={out}", "--batch_size=2000"],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  assert f"wrote {out}: 60000 mnist training images" in done.stdout
  student = small_config(tfds_data_dir=tfds_dir, idx_dir=None, train_examples=None,
                         distill_targets=str(out), distill_weight=0.5)
  targets = train.load_data(student)["train"]["teacher"]
  np.testing.assert_allclose(targets[:5], inference.predict(
      small_config(), teacher, mnist["train"]["image"][:5]), rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="comes from teachers that held out 0 training images"):
    train.load_data(dataclasses.replace(student, validation_examples=100))
  bad = subprocess.run([sys.executable, "experiments/teacher_targets.py", f"--teachers={teacher}",
                        f"--out={out}", "--batch_size=0"], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
  assert bad.returncode != 0 and "--batch_size=0 must be positive" in bad.stderr
