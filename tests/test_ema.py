"""The parameters' exponential moving average: its arithmetic, where it is used, resuming."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import train_until_crash_after_saving

from vit_jax import evaluation, inference, steps, train, train_state
from vit_jax.experiment_config import ExperimentConfig
from vit_jax.model_configs import get_model_config


def config(**overrides):
  fields = dict(model=get_model_config("testing"), batch_size=64, num_epochs=1,
                learning_rate=3e-3, warmup_steps=2, checkpoint_every_steps=4,
                log_every_steps=4, eval_batch_size=256, parallel="jit", ema_decay=0.9)
  return ExperimentConfig(**{**fields, **overrides})


def batch_of(digits, n=64):
  return {"image": jnp.asarray(digits["train"]["image"][:n], jnp.float32) / 255,
          "label": jnp.asarray(digits["train"]["label"][:n])}


@pytest.mark.slow
def test_the_average_follows_the_parameters_by_its_decay_and_is_what_evaluation_uses(digits):
  state = train_state.create_train_state(config(learning_rate=3e-2, warmup_steps=0), total_steps=10)
  assert isinstance(state, train_state.EmaTrainState)
  step = jax.jit(steps.train_step)
  history = [state.params]
  for i in range(5):  # enough for the average to lag visibly behind the parameters
    state, _ = step(state, batch_of(digits), jax.random.PRNGKey(i))
    history.append(state.params)
  # Step t's parameters weighted 0.9^(5 - t), normalised; the random start not at all.
  weights = [0.1 * 0.9 ** (5 - t) / (1 - 0.9 ** 5) for t in range(1, 6)]
  expected = jax.tree_util.tree_map(
      lambda *params: sum(w * p for w, p in zip(weights, params, strict=True)), *history[1:])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         state.ema_params, expected)
  # Evaluation reads the average, not the parameters.
  batch = {**batch_of(digits), "mask": jnp.ones(64, bool)}
  loss = jax.jit(lambda state: evaluation.eval_step(state, batch)["loss"])
  plain = train_state.TrainState.create(apply_fn=state.apply_fn, params=state.ema_params,
                                        tx=state.tx)
  assert loss(state) == loss(plain)
  assert loss(state) != loss(plain.replace(params=state.params))
  # Without an average the state is the plain one, as its checkpoints were before.
  assert type(train_state.create_train_state(config(ema_decay=0.0), 10)) is train_state.TrainState


@pytest.mark.slow
def test_the_average_is_checkpointed_resumed_bit_identically_and_predicted_with(
    tmp_path, digits, monkeypatch):
  data = {"train": {k: v[:512] for k, v in digits["train"].items()}, "test": digits["test"]}
  run = config(num_epochs=2)  # 16 steps, checkpoints every 4
  train.train_and_evaluate(run, tmp_path / "straight", data=data)
  train_until_crash_after_saving(run, tmp_path / "resumed", data, 8, monkeypatch)
  train.train_and_evaluate(run, tmp_path / "resumed", data=data)
  straight = inference.restore_state(run, tmp_path / "straight")
  resumed = inference.restore_state(run, tmp_path / "resumed")
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(straight.ema_params),
                         jax.device_get(resumed.ema_params))
  # What evaluation and prediction restore is the average.
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(resumed.params),
                         jax.device_get(resumed.ema_params))


def test_a_bad_decay_is_a_one_line_error():
  with pytest.raises(ValueError, match=r"ema_decay=1.0 must be in \[0, 1\)"):
    config(ema_decay=1.0)
