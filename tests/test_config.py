"""Experiment configs: every file in experiments/ validates; bad values fail in one line."""

import dataclasses
import importlib.util
import re
import sys
import types
import typing
from pathlib import Path

import pytest

from vit_jax.experiment_config import ExperimentConfig, as_config_dict, validate
from vit_jax.model_configs import get_model_config

EXPERIMENT_DIR = Path(__file__).resolve().parent.parent / "experiments"
EXPERIMENTS = sorted(p for p in EXPERIMENT_DIR.glob("*.py") if "def get_config" in p.read_text())


def load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_file_validates(path):
  config = validate(load(path).get_config())
  # Every field survives the way back to flags: as_config_dict loses or retypes none.
  assert validate(as_config_dict(config)) == config


def test_mnist_best_after_a_colon_takes_a_teachers_file_and_distils_from_it(monkeypatch):
  from absl import flags
  from ml_collections import config_flags

  # ml_collections loads the file into sys.modules' 'config_config', where a later load of
  # that name would find this file's get_config: a module of the test's own, undone after it.
  monkeypatch.setitem(sys.modules, "config_config", types.ModuleType("config_config"))
  parsed = flags.FlagValues()  # as launch.py parses --config=FILE:ARGUMENT
  config_flags.DEFINE_config_file("config", None, "", flag_values=parsed)
  parsed(["launch.py", f"--config={EXPERIMENT_DIR}/mnist_best.py:runs/t.npz"])
  distilled = validate(parsed.config)
  assert (distilled.distill_targets, distilled.distill_weight) == ("runs/t.npz", 0.5)
  plain = validate(load(EXPERIMENT_DIR / "mnist_best.py").get_config())
  assert (plain.distill_targets, plain.distill_weight) == (None, 0.0)
  # The distilled recipe is the recipe with a teacher, nothing else changed.
  assert dataclasses.replace(distilled, distill_targets=None, distill_weight=0.0) == plain


def base():
  return as_config_dict(ExperimentConfig(model=get_model_config("testing")))


@pytest.mark.parametrize("in_file", [None, "auto", 16])
def test_a_flag_sets_the_micro_batch_to_a_number_or_auto_whatever_the_file_said(in_file):
  def flagged(value):
    config = as_config_dict(ExperimentConfig(model=get_model_config("testing"),
                                             microbatch_size=in_file))
    config.microbatch_size = value  # as `--config.microbatch_size=VALUE` writes it
    return validate(config).microbatch_size

  assert flagged("8") == 8
  assert flagged("auto") == "auto"


def test_config_dict_round_trips_and_optional_fields_stay_settable():
  config = base()
  assert validate(config) == ExperimentConfig(model=get_model_config("testing"))
  config = as_config_dict(ExperimentConfig(model=get_model_config("testing"), num_epochs=2))
  config.tfds_data_dir = "/data"      # a None default became a typed placeholder
  config.train_examples = 1000
  config.num_epochs = 2.5             # float fields accept floats even if the file said 2
  flagged = validate(config)
  assert (flagged.tfds_data_dir, flagged.train_examples, flagged.num_epochs) == ("/data", 1000,
                                                                                2.5)
  with pytest.raises(AttributeError, match="not_a_field"):
    config.not_a_field = 1            # locked


@pytest.mark.parametrize("key,value,message", [
    ("batch_size", 0, "config.batch_size=0 must be positive"),
    ("steps_per_call", 0, "config.steps_per_call=0 must be positive"),
    ("microbatch_size", 0, "config.microbatch_size=0 must be positive, None or 'auto'"),
    ("microbatch_size", "big", "config.microbatch_size='big' must be positive, None or 'auto'"),
    ("batch_size", 1.5, "config.batch_size=1.5 has type float, expected int"),
    ("learning_rate", 0.0, "config.learning_rate=0.0 must be positive"),
    ("learning_rate", "fast", "config.learning_rate='fast' has type str"),
    ("num_epochs", -1, "config.num_epochs=-1.0 must be positive"),
    ("dataset", "cifar10", "config.dataset='cifar10' is not one of 'mnist', 'fashion_mnist'"),
    ("parallel", "gpu", "config.parallel='gpu' is not one of"),
    ("label_smoothing", 1.0, "config.label_smoothing=1.0 must be in"),
    ("train_examples", 10, "config.train_examples=10 must be at least batch_size=128"),
    ("augment_max_shift", -2, "config.augment_max_shift=-2 must be in [0, 14]"),
    ("augment_max_shift", 15, "config.augment_max_shift=15 must be in [0, 14]"),
    ("num_epochs", float("inf"), "config.num_epochs=inf must be positive and finite"),
    ("learning_rate", float("inf"), "config.learning_rate=inf must be positive and finite"),
    ("weight_decay", float("nan"), "config.weight_decay=nan must be finite"),
    ("seed", -1, "config.seed=-1 must be in [0, 2**32)"),
    ("seed", 2**32 + 5, "config.seed=4294967301 must be in [0, 2**32)"),
    ("init_from", "", "config.init_from='' must name a run's workdir"),
    ("warmup_steps", -1, "config.warmup_steps=-1 must not be negative"),
    ("seed", True, "config.seed=True has type bool"),
    ("learnig_rate", 0.1, "config.learnig_rate is not a known key"),
])
def test_bad_values_fail_with_one_line_naming_key_and_value(key, value, message):
  config = base().to_dict()
  config[key] = value
  with pytest.raises(ValueError, match=re.escape(message)) as info:
    validate(config)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("key,value,others,message", [
    ("qkv_bias", True, {"qkv": "identity"},
     "config.model.qkv_bias=True is not available with qkv='identity'"),
    ("drop_path_rate", 0.1, {"num_layers": 1},
     "config.model.drop_path_rate=0.1 needs num_layers > 1"),
])
def test_model_values_that_would_do_nothing_are_refused(key, value, others, message):
  config = base().to_dict()
  config["model"].update(others)
  validate(config)  # without the value, the model is fine
  config["model"][key] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    validate(config)


def test_model_that_does_not_fit_the_dataset_is_refused():
  config = base().to_dict()
  config["model"]["num_classes"] = 5
  with pytest.raises(ValueError, match="config.model.num_classes=5 does not fit mnist"):
    validate(config)


@pytest.mark.parametrize("overlap", [-1, 8])
def test_patch_overlap_out_of_range_is_refused(overlap):
  config = base().to_dict()
  config["model"]["patch_size"] = 7
  config["model"]["patch_overlap"] = overlap
  with pytest.raises(ValueError, match=rf"config.model.patch_overlap={overlap} must be an "
                                       r"integer from 0 to patch_size=7"):
    validate(config)


@pytest.mark.parametrize("overlap", [0, 7])
def test_patch_overlap_from_0_to_the_patch_size_is_taken(overlap):
  config = base().to_dict()
  config["model"]["patch_size"] = 7
  config["model"]["patch_overlap"] = overlap
  assert validate(config).model.patch_window == 7 + 2 * overlap


def test_bad_model_value_is_named_with_its_path():
  config = base().to_dict()
  config["model"]["patch_size"] = 5
  with pytest.raises(ValueError, match="config.model.patch_size=5 does not divide image_size=28"):
    validate(config)


@pytest.mark.parametrize("make,message", [
    (lambda: get_model_config("testing").__class__(4, 64, 2, 2, 128, dropout_rate=None),
     "dropout_rate=None has type NoneType, expected float"),
    (lambda: dataclasses.replace(get_model_config("testing"), qkv_bias="no"),
     "qkv_bias='no' has type str, expected bool"),
    (lambda: dataclasses.replace(get_model_config("testing"), qkv="low_rank", qkv_rank=True),
     "qkv_rank=True has type bool, expected int or None"),
    (lambda: ExperimentConfig(model={"patch_size": 4}),
     "model={'patch_size': 4} has type dict, expected ModelConfig"),
    (lambda: ExperimentConfig(model=get_model_config("testing"), num_epochs="3"),
     "num_epochs='3' has type str, expected float"),
])
def test_a_config_constructed_directly_gets_the_same_type_checks(make, message):
  with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
    make()
  config = ExperimentConfig(model=get_model_config("testing"), num_epochs=3)
  assert config.num_epochs == 3.0 and isinstance(config.num_epochs, float)  # an int: a float


def test_the_mode_lists_are_the_fields_literals():
  from vit_jax import kernels
  from vit_jax.model_configs import AttentionKernel

  assert typing.get_args(AttentionKernel) == ("auto", *kernels.KERNELS)
