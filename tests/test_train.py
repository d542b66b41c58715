"""Training end to end on real MNIST: learning, resuming, pmap = jit, failing loudly."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_eval_views import untrained_state

from vit_jax import evaluation, inference, steps, train
from vit_jax.checkpoints import Checkpoints
from vit_jax.experiment_config import ExperimentConfig, validate
from vit_jax.model_configs import get_model_config
from vit_jax.parallel import Runner

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))


def small_config(**overrides) -> ExperimentConfig:
  """The `testing` ViT on 1,024 images: steps of milliseconds."""
  fields = dict(model=get_model_config("testing"), train_examples=1024, batch_size=64,
                num_epochs=1, learning_rate=3e-3, warmup_steps=4, log_every_steps=1,
                checkpoint_every_steps=4, eval_batch_size=200, parallel="jit")
  fields.update(overrides)
  return ExperimentConfig(**fields)


def subset(data, n_train, n_test=1000):
  return {"train": {k: v[:n_train] for k, v in data["train"].items()},
          "test": {k: v[:n_test] for k, v in data["test"].items()}}


def read_losses(workdir):
  lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [(r["step"], r["train_loss"]) for r in map(json.loads, lines) if "train_loss" in r]


def params_of(config, workdir):
  return jax.device_get(inference.restore_state(config, workdir).params)


@pytest.mark.slow
def test_tiny_experiment_learns_mnist(tmp_path, mnist, tfds_dir):
  import tiny

  config = tiny.get_config()
  config.tfds_data_dir = tfds_dir
  config.parallel = "jit"  # eight fake devices share two cores: one is faster here
  data = subset(mnist, config.train_examples, 10000)
  result = train.train_and_evaluate(config, tmp_path / "run", data=data)
  assert result["eval_accuracy"] >= 0.90, result
  assert result["step"] == 512
  # The checkpoint evaluates to the same numbers.
  again = inference.evaluate_checkpoint(config, tmp_path / "run", data=data)
  assert again["eval_accuracy"] == pytest.approx(result["eval_accuracy"], abs=1e-6)
  records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert {"train_loss", "train_accuracy", "train_grad_norm", "learning_rate",
          "images_per_sec"} <= set(records[0])
  assert any("eval_accuracy" in r for r in records)
  # TensorFlow's own reader finds the same numbers in the TensorBoard events.
  import tensorflow as tf

  (events_file,) = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
  scalars = {(e.step, v.tag): v.simple_value
             for e in tf.compat.v1.train.summary_iterator(str(events_file))
             for v in e.summary.value}
  for record in records:
    for key, value in record.items():
      if key not in ("step", "time"):
        assert scalars[record["step"], key] == pytest.approx(value, rel=1e-6)


class SimulatedCrashError(Exception):
  pass


def train_until_crash_after_saving(config, workdir, data, step, monkeypatch) -> None:
  """Trains in `workdir` until the checkpoint of `step` is saved, then crashes."""
  original_save = Checkpoints.save

  def save_then_crash(self, saved_step, state, force=False):
    saved = original_save(self, saved_step, state, force)
    if saved_step == step:
      raise SimulatedCrashError
    return saved

  monkeypatch.setattr(Checkpoints, "save", save_then_crash)
  with pytest.raises(SimulatedCrashError):
    train.train_and_evaluate(config, workdir, data=data)
  monkeypatch.undo()


@pytest.mark.slow
def test_resume_gives_identical_parameters(tmp_path, digits, monkeypatch):
  config = small_config(num_epochs=2, model=get_model_config("testing", dropout_rate=0.1))
  data = subset(digits, 1024)  # 16 steps an epoch: 32 steps, checkpoints every 4
  train.train_and_evaluate(config, tmp_path / "straight", data=data)
  train_until_crash_after_saving(config, tmp_path / "resumed", data, 16, monkeypatch)
  result = train.train_and_evaluate(config, tmp_path / "resumed", data=data)
  assert result["step"] == 32
  straight = params_of(config, tmp_path / "straight")
  resumed = params_of(config, tmp_path / "resumed")
  jax.tree_util.tree_map(np.testing.assert_array_equal, straight, resumed)
  # The resumed run logged steps 17..32 once more, with the straight run's losses.
  assert read_losses(tmp_path / "resumed")[-16:] == read_losses(tmp_path / "straight")[-16:]


EVALUATE_MANY_TIMES = """
import numpy as np
from vit_jax import evaluation, train_state
from vit_jax.experiment_config import ExperimentConfig
from vit_jax.model_configs import get_model_config
from vit_jax.parallel import Runner
runner = Runner("pmap")
n = 4096
rng = np.random.default_rng(0)
data = runner.replicate({"image": rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
                         "label": rng.integers(0, 10, n).astype(np.int32)})
config = ExperimentConfig(model=get_model_config("testing"), parallel="pmap")
state = runner.replicate(train_state.create_train_state(config, total_steps=10))
evaluate = evaluation.Evaluator(runner, data, n, 16, "mnist")
for _ in range(30):
  result = evaluate(state)
print("accuracy", result["eval_accuracy"])
"""


@pytest.mark.slow
def test_evaluating_over_8_devices_again_and_again_does_not_hang():
  # With every batch of an evaluation in flight at once, this hung within seconds and XLA
  # aborted the process after 40 s. Its own process, so that a hang cannot take pytest down.
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  done = subprocess.run([sys.executable, "-c", EVALUATE_MANY_TIMES], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=150)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "accuracy" in done.stdout


@pytest.mark.slow
def test_pmap_and_sharded_jit_over_8_devices_match_one_device(tmp_path, mnist):
  assert jax.local_device_count() == 8
  config = small_config(num_epochs=0.5)  # 8 steps of a 64-image global batch
  data = subset(mnist, 1024)
  single = train.train_and_evaluate(config, tmp_path / "jit", data=data)
  jit_losses = [x for _, x in read_losses(tmp_path / "jit")]
  assert len(jit_losses) == 8
  # Micro-batches: 4 of 16 on one device; 2 of 4 examples on each of 8 devices.
  for mode, microbatch_size in (("pmap", None), ("shard", None), ("jit", 16), ("pmap", 4),
                                ("shard", 4)):
    name = f"{mode}-{microbatch_size}"
    result = train.train_and_evaluate(
        dataclasses.replace(config, parallel=mode, microbatch_size=microbatch_size),
        tmp_path / name, data=data)
    # Same global batch, same augmentation per example; only summation order differs.
    np.testing.assert_allclose([x for _, x in read_losses(tmp_path / name)], jit_losses,
                               rtol=1e-4, err_msg=name)
    assert result["eval_accuracy"] == pytest.approx(single["eval_accuracy"], abs=2e-3)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
        params_of(config, tmp_path / "jit"), params_of(config, tmp_path / name))


@pytest.mark.slow
@pytest.mark.parametrize("finite_loss", [False, True], ids=["loss", "gradient only"])
def test_non_finite_loss_stops_training_and_is_not_checkpointed(tmp_path, digits, monkeypatch,
                                                                finite_loss):
  original_step = steps.train_step

  def poisoned_step(state, batch, rng, **kwargs):
    image = jnp.where(state.step >= 5, jnp.nan, batch["image"])  # from the 6th step on
    state, metrics = original_step(state, {**batch, "image": image}, rng, **kwargs)
    if finite_loss:  # a batch whose loss is finite but whose gradient is not
      metrics = {**metrics, "loss": jnp.nan_to_num(metrics["loss"])}
    return state, metrics

  monkeypatch.setattr(steps, "train_step", poisoned_step)
  config = small_config(log_every_steps=4, checkpoint_every_steps=2)
  what = "gradient norm" if finite_loss else "loss"
  with pytest.raises(FloatingPointError, match=f"training {what} is nan at step 6"):
    train.train_and_evaluate(config, tmp_path / "run", data=subset(digits, 1024))
  saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert saved == [2, 4]


def reference_predictions(state, images, labels):
  """Per-example loss, correctness and probabilities in float64 numpy, normalised by hand."""
  x = (images.astype(np.float64) / 255.0 - 0.1307) / 0.3081
  logits = np.asarray(state.apply_fn({"params": state.params}, jnp.asarray(x, jnp.float32)),
                      np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  loss = -log_probs[np.arange(len(labels)), labels]
  return loss, logits.argmax(-1) == labels, np.exp(log_probs)


@pytest.mark.slow
def test_evaluation_counts_a_padded_last_batch_s_real_examples_only(digits):
  # 10 examples in batches of 4: the last batch is 2 examples and 2 paddings of example 0.
  images, labels = digits["test"]["image"][:10], digits["test"]["label"][:10].copy()
  state = untrained_state()  # not a fresh one: its zero head gives every example log(10)
  # Example 0 counted right, so that padding counted as examples would change the accuracy.
  _, _, probabilities = reference_predictions(state, images, labels)
  labels[0] = probabilities[0].argmax()
  loss, correct, _ = reference_predictions(state, images, labels)
  assert abs((loss.sum() + 2 * loss[0]) / 12 - loss.mean()) > 1e-3  # the padding would show
  runner = Runner("jit")
  evaluate = evaluation.Evaluator(runner, runner.replicate({"image": images, "label": labels}),
                             10, 4, "mnist")
  result = evaluate(runner.replicate(state))
  assert result["eval_accuracy"] == pytest.approx(correct.mean())
  assert result["eval_loss"] == pytest.approx(loss.mean(), rel=1e-5)


@pytest.mark.slow
def test_predict_gives_the_checkpoint_s_probabilities(tmp_path, digits):
  config = small_config(num_epochs=0.25)
  train.train_and_evaluate(config, tmp_path / "run", data=subset(digits, 256))
  images, labels = digits["test"]["image"][:5], digits["test"]["label"][:5]
  _, _, expected = reference_predictions(inference.restore_state(config, tmp_path / "run"),
                                         images, labels)
  np.testing.assert_allclose(inference.predict(config, tmp_path / "run", images), expected,
                             rtol=1e-5, atol=1e-6)


def test_a_batch_larger_than_the_training_data_is_refused(tmp_path, digits):
  with pytest.raises(ValueError, match=r"config.batch_size=64 exceeds the 32 training examples"):
    train.train_and_evaluate(small_config(train_examples=None), tmp_path / "run",
                             data=subset(digits, 32))


def test_eval_and_predict_need_a_checkpoint(tmp_path):
  with pytest.raises(ValueError, match="holds no readable checkpoint"):
    inference.restore_state(small_config(), tmp_path)


def test_eval_of_a_missing_workdir_says_so(tmp_path):
  with pytest.raises(ValueError, match=r"workdir=.*nowhere' does not exist"):
    inference.restore_state(small_config(), tmp_path / "nowhere")
  (tmp_path / "a_file").write_text("")
  with pytest.raises(ValueError, match=r"workdir=.*a_file' is a file, not a folder"):
    inference.restore_state(small_config(), tmp_path / "a_file")
  assert not (tmp_path / "nowhere").exists()  # evaluation made nothing


def test_validate_accepts_an_experiment_config_unchanged():
  config = small_config()
  assert validate(config) == config
