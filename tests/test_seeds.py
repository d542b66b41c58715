"""Seeds trained as one (`vit_jax.seeds`): the same as separate runs, up to float rounding."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from vit_jax import inference, seeds, train
from vit_jax.experiment_config import ExperimentConfig
from vit_jax.interrupt import TrainingInterruptedError
from vit_jax.locks import WorkdirBusyError, WorkdirLock
from vit_jax.metrics import read_metrics
from vit_jax.model_configs import get_model_config

# Dropout, shifts and random erasing on: each seed must draw its own, as its own run would.
CONFIG = ExperimentConfig(
    model=get_model_config("testing", dropout_rate=0.1), batch_size=32, microbatch_size=8,
    num_epochs=2, eval_batch_size=64, eval_every_steps=4, log_every_steps=2,
    checkpoint_every_steps=4, random_erasing=0.5)


@pytest.fixture(scope="module")
def data(digits):
  """128 training images (8 steps of 32 in two epochs), 64 held out, 128 test images."""
  train_split = {k: v[:128] for k, v in digits["train"].items()}
  held = {k: v[128:192] for k, v in digits["train"].items()}
  return {"train": train_split, "validation": held,
          "test": {k: v[:128] for k, v in digits["test"].items()}}


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["jit", "pmap"])
def test_seeds_as_one_equal_separate_runs(tmp_path, data, parallel):
  config = ExperimentConfig(**{**CONFIG.__dict__, "parallel": parallel})
  finals = seeds.train_and_evaluate_seeds(config, [3, 5], tmp_path / "group",
                                          [tmp_path / "s3", tmp_path / "s5"], data=data)
  for seed, final in zip([3, 5], finals, strict=True):
    alone = train.train_and_evaluate(ExperimentConfig(**{**config.__dict__, "seed": seed}),
                                     tmp_path / f"alone{seed}", data=data)
    for key in ("eval_loss", "eval_accuracy", "validation_loss", "train_loss"):
      np.testing.assert_allclose(final[key], alone[key], rtol=1e-4, err_msg=key)
    # Each seed's workdir is a run's: its config, its metrics, its final checkpoint.
    assert json.loads((tmp_path / f"s{seed}" / "config.json").read_text())["seed"] == seed
    logged = [r for r in read_metrics(tmp_path / f"s{seed}") if "validation_accuracy" in r]
    assert [r["step"] for r in logged] == [4, 8]
    # It logs what a run logs: attention statistics at evaluations, ranks at checkpoints.
    def logged_keys(folder):
      return {(r["step"], key) for r in read_metrics(folder) for key in r if key != "time"}
    assert logged_keys(tmp_path / f"s{seed}") == logged_keys(tmp_path / f"alone{seed}")
    params = inference.restore_state(config, tmp_path / f"s{seed}").params
    alone_params = inference.restore_state(config, tmp_path / f"alone{seed}").params
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                           params, alone_params)
  assert finals[0]["eval_loss"] != finals[1]["eval_loss"]  # two seeds, not one twice


@pytest.mark.slow
def test_an_interrupted_group_resumes_where_it_stopped(tmp_path, data, monkeypatch):
  from vit_jax import interrupt

  real = interrupt.StopSignal.should_stop

  def stop_at_step_4(self, step, every):
    if step == 4:
      self.received = 15
      return True
    return real(self, step, every)

  monkeypatch.setattr(interrupt.StopSignal, "should_stop", stop_at_step_4)
  dirs = [tmp_path / "s0", tmp_path / "s1"]
  with pytest.raises(TrainingInterruptedError):
    seeds.train_and_evaluate_seeds(CONFIG, [0, 1], tmp_path / "group", dirs, data=data)
  monkeypatch.setattr(interrupt.StopSignal, "should_stop", real)
  resumed = seeds.train_and_evaluate_seeds(CONFIG, [0, 1], tmp_path / "group", dirs,
                                           data=data)
  whole = seeds.train_and_evaluate_seeds(CONFIG, [0, 1], tmp_path / "whole",
                                         [tmp_path / "w0", tmp_path / "w1"], data=data)
  for got, want in zip(resumed, whole, strict=True):
    np.testing.assert_allclose(got["eval_loss"], want["eval_loss"], rtol=1e-5)
  # Resumed at step 4, not trained again from the start: each step logged once.
  assert [r["step"] for r in read_metrics(dirs[0]) if "train_loss" in r] == [2, 4, 6, 8]
  # A shorter schedule than the group has trained is refused, not labelled as its end.
  shorter = dataclasses.replace(CONFIG, num_epochs=1)
  with pytest.raises(ValueError, match=r"^config.num_epochs=1.0 makes 4 steps, but "
                                       r"workdir='.*group' is already at step 8$"):
    seeds.train_and_evaluate_seeds(shorter, [0, 1], tmp_path / "group", dirs, data=data)
  for folder in (tmp_path / "group", *dirs):  # their config.json still describe them
    assert json.loads((folder / "config.json").read_text())["num_epochs"] == 2
  # Another seed list would continue seed 1's stacked state as seed 2's run.
  with pytest.raises(ValueError, match=r"^seeds=\[0, 2\] are not the group's \[0, 1\]"):
    seeds.train_and_evaluate_seeds(CONFIG, [0, 2], tmp_path / "group",
                                   [dirs[0], tmp_path / "s2"], data=data)
  # A group of an older version (no seeds.json): a refused call records no seeds of its own.
  (tmp_path / "group" / "seeds.json").unlink()
  with pytest.raises(ValueError, match="config.seed=0, not 3"):
    seeds.train_and_evaluate_seeds(CONFIG, [3, 4], tmp_path / "group",
                                   [tmp_path / "s3", tmp_path / "s4"], data=data)
  assert not (tmp_path / "group" / "seeds.json").exists()


def test_bad_seed_lists_are_one_line(tmp_path, data):
  with pytest.raises(ValueError, match=r"^seeds=\[1, 1\] must be distinct"):
    seeds.train_and_evaluate_seeds(CONFIG, [1, 1], tmp_path / "g", [tmp_path / "a",
                                                                    tmp_path / "b"], data)


def test_a_seed_workdir_in_use_elsewhere_is_refused_before_training(tmp_path, data):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  with WorkdirLock(tmp_path / "b"), pytest.raises(
      WorkdirBusyError, match=r"^workdir='.*/b' is in use by pid \d+"):
    seeds.train_and_evaluate_seeds(CONFIG, [0, 1], tmp_path / "g", [tmp_path / "a",
                                                                    tmp_path / "b"], data)
  assert not (tmp_path / "b" / "metrics.jsonl").exists()
  assert not (tmp_path / "g").exists()  # made by the refused call: removed again
  with WorkdirLock(tmp_path / "b"), WorkdirLock(tmp_path / "a"):  # the group let go of a
    pass


def test_a_fine_tuning_config_is_refused_not_trained_from_scratch(tmp_path, data):
  config = dataclasses.replace(CONFIG, init_from=str(tmp_path / "source"))
  with pytest.raises(ValueError, match=r"^config.init_from='.*source' is not available for "
                                       "seeds trained as one step"):
    seeds.train_and_evaluate_seeds(config, [0, 1], tmp_path / "g", [tmp_path / "a",
                                                                    tmp_path / "b"], data)
  assert not (tmp_path / "g").exists()


@pytest.mark.slow
def test_a_non_finite_loss_names_its_seed(tmp_path, data, monkeypatch):
  import jax.numpy as jnp

  from vit_jax import steps

  original = steps.train_step

  def poisoned(state, batch, rng, **kwargs):  # NaN images from the second step on
    image = jnp.where(state.step >= 1, jnp.nan, batch["image"])
    return original(state, {**batch, "image": image}, rng, **kwargs)

  monkeypatch.setattr(steps, "train_step", poisoned)
  with pytest.raises(FloatingPointError, match=r"^training loss of seed 3 is nan at step 2; "):
    seeds.train_and_evaluate_seeds(CONFIG, [3, 5], tmp_path / "g", [tmp_path / "a",
                                                                    tmp_path / "b"], data)
