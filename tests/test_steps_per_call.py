"""Several training steps in one compiled call (`config.steps_per_call`): the same run, bit for
bit, as one step a call, each call ending where the run logs, evaluates or checkpoints."""

import json

import jax
import numpy as np
import pytest
from test_train import params_of, small_config, subset, train_until_crash_after_saving

from vit_jax import train
from vit_jax.loop import next_event
from vit_jax.model_configs import get_model_config


def calls(config, total, start=0):
  """The steps at which each call of a run from `start` to `total` ends."""
  ends = [start]
  while ends[-1] < total:
    ends.append(next_event(config, total, ends[-1]))
  return ends[1:]


def test_a_call_ends_at_each_log_checkpoint_and_evaluation_and_at_the_last_step():
  config = small_config(steps_per_call=4, log_every_steps=5, checkpoint_every_steps=7,
                        eval_every_steps=12)
  assert calls(config, 30) == [4, 5, 7, 10, 12, 14, 15, 19, 20, 21, 24, 25, 28, 30]
  assert calls(config, 30, start=13) == [14, 15, 19, 20, 21, 24, 25, 28, 30]  # resumed
  quiet = small_config(steps_per_call=4, log_every_steps=100, checkpoint_every_steps=100)
  assert calls(quiet, 10) == [4, 8, 10]
  assert calls(small_config(steps_per_call=1), 3) == [1, 2, 3]


def run_config(per_call):
  return small_config(num_epochs=2, steps_per_call=per_call, log_every_steps=5,
                      checkpoint_every_steps=7, eval_every_steps=12,
                      model=get_model_config("testing", dropout_rate=0.1))


@pytest.mark.slow
def test_steps_in_one_call_train_and_resume_the_same_run_as_one_step_a_call(tmp_path, digits,
                                                                          monkeypatch):
  data = subset(digits, 1024)  # 16 steps an epoch: 32 steps
  runs = {}
  for per_call in (1, 4):
    config = run_config(per_call)
    result = train.train_and_evaluate(config, tmp_path / str(per_call), data=data)
    lines = (tmp_path / str(per_call) / "metrics.jsonl").read_text().splitlines()
    records = [{k: v for k, v in json.loads(x).items() if k not in ("time", "images_per_sec")}
               for x in lines]
    runs[per_call] = result, records, params_of(config, tmp_path / str(per_call))
  (one, one_records, one_params), (four, four_records, four_params) = runs[1], runs[4]
  assert [r["step"] for r in four_records] == [r["step"] for r in one_records]
  # Logged every 5 steps, and where a checkpoint (7, 14, ...) or an evaluation (12, 24)
  # closes the window early.
  assert {r["step"] for r in four_records if "train_loss" in r} == {
      5, 7, 10, 12, 14, 15, 20, 21, 24, 25, 28, 30, 32}
  for a, b in zip(one_records, four_records, strict=True):
    assert a.keys() == b.keys()
    np.testing.assert_array_equal([a[k] for k in sorted(a)], [b[k] for k in sorted(b)],
                                  err_msg=f"step {a['step']}")
  jax.tree_util.tree_map(np.testing.assert_array_equal, one_params, four_params)
  assert four["eval_accuracy"] == one["eval_accuracy"]
  # Resumed from step 14 (calls then end at 15, 19, 20, 21, ... as in the straight run).
  train_until_crash_after_saving(run_config(4), tmp_path / "resumed", data, 14, monkeypatch)
  train.train_and_evaluate(run_config(4), tmp_path / "resumed", data=data)
  jax.tree_util.tree_map(np.testing.assert_array_equal, four_params,
                         params_of(run_config(4), tmp_path / "resumed"))
