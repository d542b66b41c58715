"""The validation split: held out of training, the same every run, watched during training."""

import json

import numpy as np
import pytest

from vit_jax import inference, input_pipeline, train
from vit_jax.experiment_config import ExperimentConfig
from vit_jax.model_configs import get_model_config


def numbered(n):
  """A split whose every example says which it is: image (n, 1) and label its index."""
  return {"image": np.arange(n)[:, None], "label": np.arange(n)}


def test_held_out_examples_are_disjoint_from_the_rest_and_the_same_every_time():
  rest, held = input_pipeline.hold_out(numbered(1000), 100)
  assert len(held["label"]) == 100 and len(rest["label"]) == 900
  assert not set(held["label"]) & set(rest["label"])
  assert set(held["label"]) | set(rest["label"]) == set(range(1000))
  np.testing.assert_array_equal(held["image"][:, 0], held["label"])  # pairs stay together
  again, held_again = input_pipeline.hold_out(numbered(1000), 100)
  np.testing.assert_array_equal(held_again["label"], held["label"])
  np.testing.assert_array_equal(again["label"], rest["label"])
  assert not np.array_equal(held["label"], np.arange(100))  # a random choice, not the first
  assert input_pipeline.hold_out(numbered(10), 0)[1]["label"].size == 0


def test_a_run_s_data_holds_out_what_its_config_says(monkeypatch):
  from vit_jax import mnist_source

  sizes = {"train": 60000, "test": 10000}
  monkeypatch.setattr(mnist_source, "load_split", lambda dataset, split, *dirs: (
      numbered(sizes[split])["image"], numbered(sizes[split])["label"]))
  config = ExperimentConfig(model=get_model_config("testing"), validation_examples=5000,
                            train_examples=1000)
  data = train.load_data(config)
  assert {k: len(v["label"]) for k, v in data.items()} == {
      "train": 1000, "validation": 5000, "test": 10000}
  rest, held = input_pipeline.hold_out(numbered(60000), 5000)
  np.testing.assert_array_equal(data["validation"]["label"], held["label"])
  np.testing.assert_array_equal(data["train"]["label"], rest["label"][:1000])
  plain = train.load_data(ExperimentConfig(model=get_model_config("testing")))
  assert "validation" not in plain and len(plain["train"]["label"]) == 60000


def test_holding_out_everything_is_refused():
  with pytest.raises(ValueError, match=r"validation_examples=10 must be in \[0, 10\)"):
    input_pipeline.hold_out(numbered(10), 10)


@pytest.mark.parametrize("fields,message", [
    ({"validation_examples": -1}, "config.validation_examples=-1 must not be negative"),
    ({"validation_examples": 59950}, "config.validation_examples=59950 leaves fewer than "
                                     "batch_size=128"),
    ({"validation_examples": 10000, "train_examples": 55000},
     "config.train_examples=55000 exceeds the 50000 training examples left beside "
     "validation_examples=10000"),
])
def test_impossible_validation_sizes_are_one_line_errors(fields, message):
  from vit_jax.experiment_config import validate

  with pytest.raises(ValueError, match=message):
    validate({"model": {"patch_size": 7, "hidden_size": 16, "num_layers": 1, "num_heads": 2,
                        "mlp_dim": 32}, **fields})


@pytest.mark.slow
def test_training_watches_the_validation_split_and_tests_once_at_the_end(tmp_path, digits):
  config = ExperimentConfig(model=get_model_config("testing"), batch_size=64, num_epochs=1,
                            validation_examples=256, eval_every_steps=8, eval_batch_size=128,
                            parallel="jit", augment_max_shift=0, log_every_steps=6)
  rest, held = input_pipeline.hold_out(digits["train"], config.validation_examples)
  data = {"train": rest, "validation": held, "test": digits["test"]}
  result = train.train_and_evaluate(config, tmp_path, data=data)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  during = [r for r in records if r["step"] < result["step"]]
  assert [r["step"] for r in during if "validation_accuracy" in r] == [8, 16, 24]
  assert not any("eval_accuracy" in r for r in during)  # the test split waits for the end
  logged = [r["step"] for r in records if "train_loss" in r]
  # Every log_every_steps, and where an evaluation or the end closes the window early.
  assert logged == sorted({*range(6, result["step"] + 1, 6), 8, 16, result["step"]}), logged
  final = records[-1]
  assert {"validation_accuracy", "eval_accuracy"} <= set(final)
  # The final eval_* is the test split's: what --mode=eval reports of the checkpoint.
  test = inference.evaluate_checkpoint(config, tmp_path, data=data)
  assert test["eval_accuracy"] == pytest.approx(result["eval_accuracy"], abs=1e-6)
