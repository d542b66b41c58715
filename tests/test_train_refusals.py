"""What training refuses, in one line and before harm (another run's workdir, a schedule it
has passed, batches the devices cannot share, a workdir that cannot be one), and a warm-up it
cannot give."""

import dataclasses
import json

import pytest
from test_train import small_config, subset

from vit_jax import inference, train
from vit_jax.model_configs import get_model_config

ANOTHER_RUN = [
    ({"model": get_model_config("testing", num_heads=4)},
     r"different model \(model.num_heads: 2 -> 4\)"),
    ({"dataset": "fashion_mnist"},
     r"holds a run on mnist, not config.dataset='fashion_mnist'; pass that run's config"),
    ({"ema_decay": 0.9},  # its checkpoints lack the averaged parameters
     r"holds a run with config.ema_decay=0.0, not 0.9; use a new workdir$"),
]
IDS = ["model", "dataset", "ema_decay"]
# Evaluation reads the test split only: any held-out count will do there.
MORE_HELD_OUT = ({"validation_examples": 64},  # images it trained on would be held out
                 r"held out 0 images and trained on the rest: "
                 r"config.validation_examples=64 would hold out images it trained on; "
                 r"use a new workdir$")


ANOTHER_SEED = ({"seed": 3},  # another data order and other draws under the same name
                r"holds a run with config.seed=0, not 3; a run keeps its seed: use a new workdir$")


# Another model differs in more fields (here its held-out count and seed): the model is named.
ANOTHER_MODEL_AND_MORE = ({"model": get_model_config("testing", num_heads=4), "seed": 3,
                           "validation_examples": 64}, r"different model \(model.num_heads")


@pytest.mark.parametrize("change,message", [*ANOTHER_RUN, MORE_HELD_OUT, ANOTHER_SEED,
                                            ANOTHER_MODEL_AND_MORE],
                         ids=[*IDS, "validation_examples", "seed", "model_first"])
def test_resuming_with_another_model_or_dataset_is_refused(tmp_path, digits, change, message):
  data = subset(digits, 256)
  config = small_config(num_epochs=0.25)
  train.train_and_evaluate(config, tmp_path / "run", data=data)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(dataclasses.replace(config, **change), tmp_path / "run", data=data)


@pytest.mark.parametrize("change,message", ANOTHER_RUN, ids=IDS)
def test_eval_of_a_workdir_with_another_model_or_dataset_is_refused(tmp_path, digits, change,
                                                                    message):
  data = subset(digits, 256)
  config = small_config(num_epochs=0.25)
  train.train_and_evaluate(config, tmp_path / "run", data=data)
  with pytest.raises(ValueError, match=message) as error:
    inference.evaluate_checkpoint(dataclasses.replace(config, **change), tmp_path / "run",
                                  data=data)
  assert "use a new workdir" not in str(error.value) or "ema_decay" in str(error.value)
  assert (tmp_path / "run" / "checkpoints" / "1").is_dir()  # nothing moved aside
  inference.evaluate_checkpoint(dataclasses.replace(config, validation_examples=64),
                                tmp_path / "run", data=data)


def test_evaluating_with_other_test_time_views_than_the_run_s_says_so(tmp_path, digits, capsys):
  data = subset(digits, 256)
  config = small_config(num_epochs=0.25)
  train.train_and_evaluate(config, tmp_path / "run", data=data)
  capsys.readouterr()
  inference.evaluate_checkpoint(config, tmp_path / "run", data=data)
  assert "note:" not in capsys.readouterr().err
  inference.evaluate_checkpoint(dataclasses.replace(config, eval_max_shift=1), tmp_path / "run",
                                data=data)
  assert "note: evaluating with eval_max_shift=1, not the run's own test-time views" in (
      capsys.readouterr().err)


@pytest.mark.slow
def test_resuming_past_the_configured_end_is_refused(tmp_path, digits):
  data = subset(digits, 256)
  config = small_config(num_epochs=1)  # 4 steps
  train.train_and_evaluate(config, tmp_path / "run", data=data)
  with pytest.raises(ValueError, match="num_epochs=0.5 makes 2 steps, but .* at step 4"):
    train.train_and_evaluate(dataclasses.replace(config, num_epochs=0.5), tmp_path / "run",
                             data=data)
  # The workdir's config.json still describes its checkpoints.
  assert json.loads((tmp_path / "run" / "config.json").read_text())["num_epochs"] == 1


@pytest.mark.slow
def test_a_resume_with_other_settings_keeps_the_replaced_config_in_the_history(tmp_path, digits,
                                                                              capsys):
  data = subset(digits, 256)
  config = small_config(num_epochs=0.5)
  train.train_and_evaluate(config, tmp_path / "run", data=data)
  train.train_and_evaluate(dataclasses.replace(config, num_epochs=1, learning_rate=5e-4),
                           tmp_path / "run", data=data)
  records = (tmp_path / "run" / "config_history.jsonl").read_text().splitlines()
  assert [(json.loads(r)["num_epochs"], json.loads(r)["learning_rate"]) for r in records] == [
      (0.5, config.learning_rate)]
  now = json.loads((tmp_path / "run" / "config.json").read_text())
  assert (now["num_epochs"], now["learning_rate"]) == (1, 5e-4)
  # Started again when finished, it trains nothing: config.json stays the one it ran with,
  # and the changed settings, which changed nothing, are said to have changed nothing.
  capsys.readouterr()
  train.train_and_evaluate(dataclasses.replace(config, num_epochs=1, learning_rate=1e-4),
                           tmp_path / "run", data=data)
  assert ("the run is finished at step 4: nothing is trained, so learning_rate change at most "
          "the evaluation, and config.json keeps the run's own") in capsys.readouterr().err
  assert json.loads((tmp_path / "run" / "config.json").read_text())["learning_rate"] == 5e-4
  assert len((tmp_path / "run" / "config_history.jsonl").read_text().splitlines()) == 1


def test_a_fraction_of_an_epoch_takes_the_steps_it_names_despite_float_rounding():
  # 1.1 * 100 is 110.00000000000001 and 0.55 * 100 is 55.00000000000001 in floats.
  assert [train.total_train_steps(small_config(num_epochs=e, batch_size=10), 1000)
          for e in (1.1, 0.55, 0.555, 2.0)] == [110, 55, 56, 200]


def test_batch_not_divisible_by_devices_is_refused_before_writing(tmp_path, digits):
  config = small_config(batch_size=60, parallel="pmap")
  with pytest.raises(ValueError, match="config.batch_size=60 is not divisible by the 8 devices"):
    train.train_and_evaluate(config, tmp_path / "run", data=subset(digits, 256))
  assert not (tmp_path / "run").exists()


def test_microbatch_size_that_does_not_divide_a_devices_share_is_refused(tmp_path, digits):
  config = small_config(microbatch_size=3, parallel="pmap")  # 64 over 8 devices: 8 each
  with pytest.raises(ValueError, match="config.microbatch_size=3 does not divide the 8 examples "
                                       "per device of config.batch_size=64 over 8 devices"):
    train.train_and_evaluate(config, tmp_path / "run", data=subset(digits, 256))
  assert not (tmp_path / "run").exists()


def test_workdir_that_is_a_file_is_refused(tmp_path, digits):
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="workdir=.*file.* is a file, not a folder"):
    train.train_and_evaluate(small_config(), tmp_path / "file", data=subset(digits, 256))


def test_an_empty_workdir_name_is_refused_not_taken_as_the_current_folder(digits):
  with pytest.raises(ValueError, match=r"^workdir='' names no folder$"):
    train.train_and_evaluate(small_config(), "", data=subset(digits, 256))


def test_workdir_that_cannot_be_created_is_refused(tmp_path, digits):
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="workdir=.*file/run.* cannot be created: Not a directory"):
    train.train_and_evaluate(small_config(), tmp_path / "file" / "run", data=subset(digits, 256))


def test_a_run_refused_in_a_folder_it_created_removes_it_and_keeps_one_it_found(tmp_path,
                                                                               digits):
  too_few = subset(digits, 32)  # refused once the workdir is made and locked
  message = r"^config.batch_size=64 exceeds the 32 training examples$"
  (tmp_path / "runs").mkdir()
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(small_config(), tmp_path / "runs" / "typo", data=too_few)
  assert list((tmp_path / "runs").iterdir()) == []
  with pytest.raises(ValueError, match=message):  # and the folders made above it
    train.train_and_evaluate(small_config(), tmp_path / "rnus" / "a" / "b", data=too_few)
  assert not (tmp_path / "rnus").exists()
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("the user's")
  (tmp_path / "other").mkdir()
  for folder in ("mine", "other"):
    with pytest.raises(ValueError, match=message):
      train.train_and_evaluate(small_config(), tmp_path / folder, data=too_few)
  assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's"
  assert (tmp_path / "other").is_dir()  # an empty folder the user made stays


@pytest.mark.slow
def test_a_warm_up_as_long_as_the_run_is_said_in_one_line(tmp_path, digits, capsys):
  config = small_config(num_epochs=0.25)  # 4 steps of 64, warm-up 4
  train.train_and_evaluate(config, tmp_path / "run", data=subset(digits, 1024))
  assert ("config.warmup_steps=4 is not below the run's 4 steps: warm-up cut to 3, the "
          "learning rate never decays") in capsys.readouterr().err
  train.train_and_evaluate(small_config(num_epochs=0.5), tmp_path / "longer",
                           data=subset(digits, 1024))
  assert "warmup_steps" not in capsys.readouterr().err
