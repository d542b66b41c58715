"""The pure steps: micro-batches, the cross-device mean, the schedule, the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train import small_config

from vit_jax import steps, train_state
from vit_jax.parallel import Runner


def test_number_of_microbatches_per_step():
  runner = Runner("jit")
  assert runner.num_microbatches(128, None) == 1
  assert runner.num_microbatches(128, 16) == 8
  assert runner.num_microbatches(128, 128) == runner.num_microbatches(128, 500) == 1
  assert Runner("pmap").num_microbatches(128, 4) == 4  # 16 examples on each of 8 devices
  with pytest.raises(ValueError, match="config.microbatch_size=48 does not divide the 128 "
                                       "examples per device of config.batch_size=128$"):
    runner.num_microbatches(128, 48)


def test_microbatches_are_strided_so_that_each_spans_the_batch():
  batch = {"label": jnp.arange(6), "image": jnp.arange(6 * 2).reshape(6, 2)}
  microbatches = steps.split_microbatches(batch, 3)
  np.testing.assert_array_equal(microbatches["label"], [[0, 3], [1, 4], [2, 5]])
  np.testing.assert_array_equal(microbatches["image"][1], [[2, 3], [8, 9]])
  with pytest.raises(ValueError, match="4 micro-batches do not divide a batch of 6"):
    steps.split_microbatches(batch, 4)


@pytest.mark.slow
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_microbatched_step_gives_the_gradient_of_the_whole_batch(digits, label_smoothing):
  initial = train_state.create_train_state(small_config(), total_steps=10)
  # The head starts at zero, which would leave the rest with zero gradient: give it weights.
  head = jax.random.normal(jax.random.PRNGKey(1), initial.params["head"]["kernel"].shape)
  params = {**initial.params, "head": {**initial.params["head"], "kernel": head}}
  # Plain SGD with learning rate 1: the update is minus the gradient, unclipped, unscaled.
  state = train_state.TrainState.create(apply_fn=initial.apply_fn, params=params, tx=optax.sgd(1.0))
  batch = {"image": jnp.asarray(digits["train"]["image"][:32], jnp.float32) / 255,
           "label": jnp.asarray(digits["train"]["label"][:32])}

  def whole_batch_loss(params):  # the reference: one mean over the batch, differentiated
    logits = state.apply_fn({"params": params}, batch["image"], train=True)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return steps.cross_entropy(logits, batch["label"], label_smoothing).mean(), accuracy

  (expected_loss, expected_accuracy), expected_grads = jax.jit(jax.value_and_grad(
      whole_batch_loss, has_aux=True))(params)
  step = jax.jit(steps.train_step, static_argnames=("label_smoothing", "num_microbatches"))
  for k in (1, 2, 8):
    new, metrics = step(state, batch, jax.random.PRNGKey(0), label_smoothing=label_smoothing,
                        num_microbatches=k)
    grads = jax.tree_util.tree_map(jnp.subtract, state.params, new.params)
    jax.tree_util.tree_map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6),
                           grads, expected_grads)
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], expected_accuracy)


def test_mean_over_devices_is_each_leafs_pmean_in_one_all_reduce():
  n = jax.local_device_count()
  tree = {"kernel": jnp.arange(n * 6, dtype=jnp.float32).reshape(n, 2, 3) ** 2,
          "bias": -jnp.arange(n, dtype=jnp.float32), "loss": jnp.arange(n) / 3}
  mean = jax.pmap(lambda t: steps.mean_over_devices(t, "d"), axis_name="d")
  per_leaf = jax.pmap(lambda t: jax.lax.pmean(t, "d"), axis_name="d")
  got, expected = mean(tree), per_leaf(tree)
  for key in tree:
    assert got[key].shape == tree[key].shape and got[key].dtype == jnp.float32, key
    np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, err_msg=key)
  # The point of it: one all-reduce of one array, where XLA makes a per-leaf pmean into one
  # all-reduce of a tuple of arrays (which the CPU runtime synchronises array by array).
  def all_reduce_results(fn):
    return [line.split(" = ")[1].split(" all-reduce(")[0]
            for line in fn.lower(tree).compile().as_text().splitlines() if " all-reduce(" in line]

  assert all_reduce_results(mean) == ["f32[8]{0}"]  # 6 + 1 + 1 floats per device
  assert all_reduce_results(per_leaf)[0].startswith("(")


def test_learning_rate_schedule_warms_up_then_decays():
  config = small_config(learning_rate=1e-3, warmup_steps=10)
  schedule = train_state.learning_rate_schedule(config, 100)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(1e-3)
  assert float(schedule(5)) == pytest.approx(5e-4)
  assert 0 < float(schedule(55)) < 1e-3
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)


def test_label_smoothing_changes_the_loss():
  logits, labels = jnp.array([[4.0, 0.0, 0.0]]), jnp.array([0])
  plain = float(steps.cross_entropy(logits, labels)[0])
  smoothed = float(steps.cross_entropy(logits, labels, 0.1)[0])
  p = np.exp([4.0, 0, 0]) / np.exp([4.0, 0, 0]).sum()
  assert plain == pytest.approx(-np.log(p[0]), rel=1e-5)
  target = np.array([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
  assert smoothed == pytest.approx(-(target * np.log(p)).sum(), rel=1e-5)


@pytest.mark.slow
def test_the_optimizer_decays_the_weights_and_clips_the_gradient_as_configured():
  config = small_config(warmup_steps=0, learning_rate=1e-2, weight_decay=0.5,
                        grad_clip_norm=1e-3)
  state = train_state.create_train_state(config, total_steps=10)
  assert float(train_state.learning_rate_schedule(config, 10)(0)) == pytest.approx(1e-2)
  # No gradient: Adam's part of the update is 0, and the decay alone moves the weights.
  zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
  decayed = state.apply_gradients(grads=zeros).params
  jax.tree_util.tree_map(lambda new, old: np.testing.assert_allclose(
      new, old * (1 - 1e-2 * 0.5), rtol=1e-6), decayed, state.params)
  # A gradient of global norm 1,000: Adam's first moment holds (1 - b1) times the clipped one.
  ones = jax.tree_util.tree_map(jnp.ones_like, state.params)
  norm = float(optax.tree.norm(ones))
  large = jax.tree_util.tree_map(lambda g: g * 1000 / norm, ones)
  adam, = [s for s in jax.tree_util.tree_leaves(
      state.apply_gradients(grads=large).opt_state,
      is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
      if isinstance(s, optax.ScaleByAdamState)]
  assert float(optax.tree.norm(adam.mu)) == pytest.approx(0.1 * 1e-3, rel=1e-4)
