"""Training end to end on real MNIST: learning, resuming, pmap = jit, failing loudly."""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import train
from vit_jax.checkpoints import Checkpoints
from vit_jax.experiment_config import ExperimentConfig, validate
from vit_jax.model_configs import get_model_config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))


def small_config(**overrides) -> ExperimentConfig:
  """The `testing` ViT on 1,024 images: steps of milliseconds."""
  fields = dict(model=get_model_config("testing"), train_examples=1024, batch_size=64,
                num_epochs=1, learning_rate=3e-3, warmup_steps=4, log_every_steps=1,
                checkpoint_every_steps=4, eval_batch_size=200, parallel="jit")
  fields.update(overrides)
  return ExperimentConfig(**fields)


def subset(mnist, n_train, n_test=1000):
  return {"train": {k: v[:n_train] for k, v in mnist["train"].items()},
          "test": {k: v[:n_test] for k, v in mnist["test"].items()}}


def read_losses(workdir):
  lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [(r["step"], r["train_loss"]) for r in map(json.loads, lines) if "train_loss" in r]


def params_of(config, workdir):
  return jax.device_get(train.restore_state(config, workdir).params)


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
  again = train.evaluate_checkpoint(config, tmp_path / "run", data=data)
  assert again["eval_accuracy"] == pytest.approx(result["eval_accuracy"], abs=1e-6)
  records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert {"train_loss", "train_accuracy", "learning_rate", "images_per_sec"} <= set(records[0])
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


def test_resume_gives_identical_parameters(tmp_path, mnist, monkeypatch):
  config = small_config(num_epochs=2, model=get_model_config("testing", dropout_rate=0.1))
  data = subset(mnist, 1024)  # 16 steps an epoch: 32 steps, checkpoints every 4
  train.train_and_evaluate(config, tmp_path / "straight", data=data)

  original_save = Checkpoints.save

  def save_then_crash(self, step, state, force=False):
    saved = original_save(self, step, state, force)
    if step == 16:
      raise SimulatedCrashError
    return saved

  monkeypatch.setattr(Checkpoints, "save", save_then_crash)
  with pytest.raises(SimulatedCrashError):
    train.train_and_evaluate(config, tmp_path / "resumed", data=data)
  monkeypatch.undo()
  result = train.train_and_evaluate(config, tmp_path / "resumed", data=data)
  assert result["step"] == 32
  straight = params_of(config, tmp_path / "straight")
  resumed = params_of(config, tmp_path / "resumed")
  jax.tree_util.tree_map(np.testing.assert_array_equal, straight, resumed)
  # The resumed run logged steps 17..32 once more, with the straight run's losses.
  assert read_losses(tmp_path / "resumed")[-16:] == read_losses(tmp_path / "straight")[-16:]


@pytest.mark.slow
def test_pmap_and_sharded_jit_over_8_devices_match_one_device(tmp_path, mnist):
  assert jax.local_device_count() == 8
  config = small_config(num_epochs=0.5)  # 8 steps of a 64-image global batch
  data = subset(mnist, 1024)
  single = train.train_and_evaluate(config, tmp_path / "jit", data=data)
  jit_losses = [x for _, x in read_losses(tmp_path / "jit")]
  assert len(jit_losses) == 8
  for mode in ("pmap", "shard"):
    result = train.train_and_evaluate(dataclasses.replace(config, parallel=mode),
                                      tmp_path / mode, data=data)
    # Same global batch, same augmentation per example; only summation order differs.
    np.testing.assert_allclose([x for _, x in read_losses(tmp_path / mode)], jit_losses,
                               rtol=1e-4, err_msg=mode)
    assert result["eval_accuracy"] == pytest.approx(single["eval_accuracy"], abs=2e-3)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
        params_of(config, tmp_path / "jit"), params_of(config, tmp_path / mode))


def test_non_finite_loss_stops_training_and_is_not_checkpointed(tmp_path, mnist, monkeypatch):
  original_step = train.train_step

  def poisoned_step(state, batch, rng, **kwargs):
    image = jnp.where(state.step >= 5, jnp.nan, batch["image"])  # from the 6th step on
    return original_step(state, {**batch, "image": image}, rng, **kwargs)

  monkeypatch.setattr(train, "train_step", poisoned_step)
  config = small_config(log_every_steps=4, checkpoint_every_steps=2)
  with pytest.raises(FloatingPointError, match="training loss is nan at step 6"):
    train.train_and_evaluate(config, tmp_path / "run", data=subset(mnist, 1024))
  saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert saved == [2, 4]


def test_resuming_with_another_model_is_refused(tmp_path, mnist):
  data = subset(mnist, 256)
  config = small_config(num_epochs=0.25)
  train.train_and_evaluate(config, tmp_path / "run", data=data)
  other = dataclasses.replace(config, model=get_model_config("testing", num_heads=4))
  with pytest.raises(ValueError, match=r"different model \(model.num_heads: 2 -> 4\)"):
    train.train_and_evaluate(other, tmp_path / "run", data=data)


def test_eval_of_a_workdir_with_another_model_is_refused(tmp_path, mnist):
  data = subset(mnist, 256)
  config = small_config(num_epochs=0.25)
  train.train_and_evaluate(config, tmp_path / "run", data=data)
  other = dataclasses.replace(config, model=get_model_config("testing", num_heads=4))
  with pytest.raises(ValueError, match=r"different model \(model.num_heads: 2 -> 4\)"):
    train.evaluate_checkpoint(other, tmp_path / "run", data=data)
  assert (tmp_path / "run" / "checkpoints" / "1").is_dir()  # nothing moved aside


def test_resuming_past_the_configured_end_is_refused(tmp_path, mnist):
  data = subset(mnist, 256)
  config = small_config(num_epochs=1)  # 4 steps
  train.train_and_evaluate(config, tmp_path / "run", data=data)
  with pytest.raises(ValueError, match="num_epochs=0.5 makes 2 steps, but .* at step 4"):
    train.train_and_evaluate(dataclasses.replace(config, num_epochs=0.5), tmp_path / "run",
                             data=data)


def test_batch_not_divisible_by_devices_is_refused_before_writing(tmp_path, mnist):
  config = small_config(batch_size=60, parallel="pmap")
  with pytest.raises(ValueError, match="config.batch_size=60 is not divisible by the 8 devices"):
    train.train_and_evaluate(config, tmp_path / "run", data=subset(mnist, 256))
  assert not (tmp_path / "run").exists()


def test_workdir_that_is_a_file_is_refused(tmp_path, mnist):
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="workdir=.*file.* is a file, not a folder"):
    train.train_and_evaluate(small_config(), tmp_path / "file", data=subset(mnist, 256))


def test_workdir_that_cannot_be_created_is_refused(tmp_path, mnist):
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="workdir=.*file/run.* cannot be created: Not a directory"):
    train.train_and_evaluate(small_config(), tmp_path / "file" / "run", data=subset(mnist, 256))


def test_eval_and_predict_need_a_checkpoint(tmp_path):
  with pytest.raises(ValueError, match="holds no readable checkpoint"):
    train.restore_state(small_config(), tmp_path)


def test_learning_rate_schedule_warms_up_then_decays():
  schedule = train.learning_rate_schedule(small_config(learning_rate=1e-3, warmup_steps=10), 100)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(1e-3)
  assert float(schedule(5)) == pytest.approx(5e-4)
  assert 0 < float(schedule(55)) < 1e-3
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)


def test_label_smoothing_changes_the_loss():
  logits, labels = jnp.array([[4.0, 0.0, 0.0]]), jnp.array([0])
  plain = float(train.cross_entropy(logits, labels)[0])
  smoothed = float(train.cross_entropy(logits, labels, 0.1)[0])
  p = np.exp([4.0, 0, 0]) / np.exp([4.0, 0, 0]).sum()
  assert plain == pytest.approx(-np.log(p[0]), rel=1e-5)
  target = np.array([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
  assert smoothed == pytest.approx(-(target * np.log(p)).sum(), rel=1e-5)


def test_validate_accepts_an_experiment_config_unchanged():
  config = small_config()
  assert validate(config) == config
