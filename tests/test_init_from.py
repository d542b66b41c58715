"""Fine-tuning from another run (`config.init_from`): what is carried over, what cannot be."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from vit_jax import inference, init_from, models, train
from vit_jax.experiment_config import ExperimentConfig
from vit_jax.model_configs import get_model_config


def config(**overrides):
  fields = dict(model=get_model_config("testing"), batch_size=64, num_epochs=0.25,
                learning_rate=3e-3, warmup_steps=2, checkpoint_every_steps=100,
                log_every_steps=4, eval_batch_size=256, parallel="jit", augment_max_shift=0)
  return ExperimentConfig(**{**fields, **overrides})


def params_of(model, seed=0):
  """Fresh parameters, the head's made non-zero (it starts at zero: every head would be
  equal, a kept one and a fresh one alike)."""
  images = jax.numpy.zeros((1, 28, 28, 1))
  params = jax.jit(models.ViT(model).init)(jax.random.PRNGKey(seed), images)["params"]
  return {**params, "head": jax.tree_util.tree_map(lambda x: x + seed + 1.0, params["head"])}


def leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in
             zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def test_the_same_model_takes_every_parameter_and_keeps_the_head():
  model = get_model_config("testing")
  source, fresh = params_of(model, seed=1), params_of(model, seed=2)
  params, notes = init_from.transfer(source, fresh, model, model, reinit_head=False)
  assert leaves_equal(params, source) and notes == []


def test_the_head_is_fresh_when_asked_or_when_the_classes_differ():
  model, five = get_model_config("testing"), get_model_config("testing", num_classes=5)
  source = params_of(model, seed=1)
  for target, reinit in ((model, True), (five, False)):
    fresh = params_of(target, seed=2)
    params, notes = init_from.transfer(source, fresh, model, target, reinit_head=reinit)
    assert leaves_equal(params["head"], fresh["head"])
    assert leaves_equal(params["encoder"], source["encoder"])
    assert notes == ["the classifier head re-initialised"]


def test_another_patch_size_resamples_the_grid_and_keeps_the_class_token():
  seven, four = get_model_config("testing"), get_model_config("testing", patch_size=4)
  source = params_of(seven, seed=1)
  params, notes = init_from.transfer(source, params_of(four, seed=2), seven, four, False)
  assert params["pos_embedding"].shape == (1, 1 + 49, 16)
  assert params["patch_embedding"]["projection"]["kernel"].shape == (16, 16)
  np.testing.assert_array_equal(params["pos_embedding"][:, 0], source["pos_embedding"][:, 0])
  assert leaves_equal(params["encoder"], source["encoder"])
  assert len(notes) == 2


def test_overlapping_patches_resize_their_whole_window():
  seven, four = (get_model_config("testing", patch_size=p, patch_overlap=1) for p in (7, 4))
  source = params_of(seven, seed=1)
  params, notes = init_from.transfer(source, params_of(four, seed=2), seven, four, False)
  assert params["patch_embedding"]["projection"]["kernel"].shape == (36, 16)
  assert "patch projection resized from 9x9 to 6x6" in notes


@pytest.mark.parametrize("field, value", [("hidden_size", 32), ("num_layers", 2),
                                          ("qkv", "separate"), ("patch_overlap", 1)])
def test_what_cannot_be_mapped_is_one_line_naming_the_field(field, value):
  target = get_model_config("testing", **{field: value})
  with pytest.raises(ValueError, match=rf"^config.init_from='runs/a': its model.{field}="):
    init_from.check_mappable(get_model_config("testing"), target, "runs/a")


@pytest.mark.slow
def test_low_rank_projections_need_the_same_rank_and_heads_and_others_only_the_width():
  source = get_model_config("testing", qkv="low_rank", qkv_rank=2)
  for field, value in (("qkv_rank", 4), ("num_heads", 4)):
    target = dataclasses.replace(source, **{field: value})
    with pytest.raises(ValueError, match=rf"^config.init_from='runs/a': its model.{field}=.*"
                                         r"\(not for qkv='low_rank'\) the head count"):
      init_from.check_mappable(source, target, "runs/a")
  fused = get_model_config("testing")
  init_from.check_mappable(fused, dataclasses.replace(fused, num_heads=4), "runs/a")
  # And a pair it let through by mistake is one line, not Flax's shape error at the first step.
  four = dataclasses.replace(source, num_heads=4)
  with pytest.raises(ValueError, match=r"^config.init_from: its parameter .*/attention/to_._a is "
                                       r"\(16, 4\), this model's \(16, 8\)$"):
    init_from.transfer(params_of(source), params_of(four), source, four, False)


def test_reinit_head_needs_init_from():
  with pytest.raises(ValueError, match="reinit_head=True .*needs config.init_from"):
    config(reinit_head=True)


@pytest.mark.slow
def test_a_run_starts_from_the_source_and_only_then(tmp_path, digits, capsys):
  learned = train.train_and_evaluate(config(seed=1, num_epochs=1), tmp_path / "source",
                                     data=digits)
  source = inference.restore_state(config(seed=1, num_epochs=1), tmp_path / "source")
  # A learning rate too small to move anything: the run evaluates its starting point.
  tune = config(init_from=str(tmp_path / "source"), learning_rate=1e-12, ema_decay=0.5)
  result = train.train_and_evaluate(tune, tmp_path / "tuned", data=digits)
  shown = capsys.readouterr()
  assert f"parameters from {tmp_path / 'source'} (step 32)" in shown.out + shown.err
  tuned = inference.restore_state(tune, tmp_path / "tuned")
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                         jax.device_get(tuned.params), jax.device_get(source.params))
  assert learned["eval_accuracy"] > 0.5  # what the source learned, not a fresh model's 10 %
  assert abs(result["eval_accuracy"] - learned["eval_accuracy"]) <= 1 / 512


@pytest.mark.slow
def test_a_resumed_fine_tune_goes_on_from_its_own_checkpoint(tmp_path, digits, capsys,
                                                             monkeypatch):
  from test_train import train_until_crash_after_saving

  train.train_and_evaluate(config(seed=1, num_epochs=1), tmp_path / "source", data=digits)
  tune = config(init_from=str(tmp_path / "source"), checkpoint_every_steps=4)  # 8 steps
  train.train_and_evaluate(tune, tmp_path / "straight", data=digits)
  train_until_crash_after_saving(tune, tmp_path / "resumed", digits, 4, monkeypatch)
  capsys.readouterr()
  train.train_and_evaluate(tune, tmp_path / "resumed", data=digits)
  shown = capsys.readouterr()
  assert "parameters from" not in shown.out + shown.err  # the source is read only at the start
  straight, resumed = (inference.restore_state(tune, tmp_path / name).params
                       for name in ("straight", "resumed"))
  assert leaves_equal(jax.device_get(straight), jax.device_get(resumed))


def test_a_source_that_cannot_be_used_fails_before_the_run_writes_anything(tmp_path, digits):
  with pytest.raises(ValueError, match=r"^config.init_from='.*nothing': workdir=.* holds no"):
    train.train_and_evaluate(config(init_from=str(tmp_path / "nothing")), tmp_path / "a",
                             data=digits)
  source = tmp_path / "source"
  source.mkdir()
  (source / "config.json").write_text(json.dumps(dataclasses.asdict(config())))
  wider = config(model=get_model_config("testing", hidden_size=32), init_from=str(source))
  with pytest.raises(ValueError, match="its model.hidden_size=16 differs from model.hidden"):
    train.train_and_evaluate(wider, tmp_path / "b", data=digits)
  # Validation images the source trained on.
  leaky = config(init_from=str(source), validation_examples=64)
  with pytest.raises(ValueError, match=r"held out 0 images and trained on the rest: "
                                       r"config.validation_examples=64 would hold out "
                                       r"images it trained on; hold out at most"):
    train.train_and_evaluate(leaky, tmp_path / "c", data=digits)
  assert not any((tmp_path / name).exists() for name in "abc")
