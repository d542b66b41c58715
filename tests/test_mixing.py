"""Mixup and CutMix: each image mixed with its partner, its neighbour in pairs, its target with
the partner's label in the same shares, and nothing at strength 0."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train import small_config

from vit_jax import augment, input_pipeline, steps, train_state
from vit_jax.training_images import mixed_images, training_batch


def images(n=8):
  """n (28, 28, 1) images of distinct constant grey levels: 10, 40, 70, ..."""
  return jnp.broadcast_to(10.0 + 30.0 * jnp.arange(n)[:, None, None, None], (n, 28, 28, 1))


def keys(n, seed=0):
  return input_pipeline.example_keys(jax.random.PRNGKey(seed), np.arange(n))


mix = jax.jit(augment.random_mix, static_argnums=(2, 3))
PAIRS = np.array([1, 0, 3, 2, 5, 4, 7, 6])  # 8 examples' partners


def test_partners_are_neighbours_in_pairs_and_the_last_of_an_odd_batch_its_own():
  np.testing.assert_array_equal(augment.mix_partners(8), PAIRS)
  np.testing.assert_array_equal(augment.mix_partners(5), [1, 0, 3, 2, 4])


def test_no_mixing_at_strength_0():
  x = images()
  mixed, weights = augment.random_mix(x, keys(8), 0.0, 0.0)
  assert mixed is x
  np.testing.assert_array_equal(weights, np.ones(8))


def test_mixup_blends_each_image_with_its_partner_by_its_weight():
  x = images()
  mixed, weights = mix(x, keys(8), 0.4, 0.0)
  assert mixed.shape == x.shape and mixed.dtype == jnp.float32 and weights.shape == (8,)
  assert np.all((weights >= 0) & (weights <= 1)) and np.unique(weights).size == 8
  expected = weights[:, None, None, None] * x + (1 - weights[:, None, None, None]) * x[PAIRS]
  np.testing.assert_allclose(mixed, expected, rtol=1e-6)


def test_cutmix_pastes_a_box_of_the_partner_whose_share_is_the_partner_s_weight():
  x = images()
  mixed, weights = mix(x, keys(8, seed=3), 0.0, 1.0)
  own, partner = np.asarray(mixed) == np.asarray(x), np.asarray(mixed) == np.asarray(x[PAIRS])
  assert np.all(own | partner)  # every pixel is one image's or the other's
  np.testing.assert_allclose(own.mean(axis=(1, 2, 3)), weights, rtol=1e-6)
  assert np.any(weights < 1)
  for i in np.flatnonzero(weights < 1):  # the pasted pixels form one rectangle
    rows, cols = np.nonzero(partner[i, ..., 0])
    assert (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) == len(rows)


def test_with_both_each_example_takes_one_of_the_two():
  x = images(64)
  mixed, weights = mix(x, keys(64), 1.0, 1.0)
  w, partner = weights[:, None, None, None], x[augment.mix_partners(64)]
  blended = np.all(np.isclose(mixed, w * x + (1 - w) * partner, rtol=1e-6), axis=(1, 2, 3))
  pasted = np.all((mixed == x) | (mixed == partner), axis=(1, 2, 3))
  assert np.all(blended | pasted)
  # About half blended, half pasted.
  assert 10 < np.sum(blended & ~pasted) < 54 and 10 < np.sum(pasted & ~blended) < 54


def test_a_small_alpha_mostly_keeps_one_image():
  x = images(512)
  near_pure = {alpha: np.mean(np.abs(mix(x, keys(512), alpha, 0.0)[1] - 0.5) > 0.4)
               for alpha in (0.1, 4.0)}
  assert near_pure[0.1] > 0.6 and near_pure[4.0] < 0.1


def test_mixing_is_a_function_of_the_keys():
  x = images()
  first, again, other = (mix(x, keys(8, seed), 0.4, 1.0) for seed in (0, 0, 1))
  np.testing.assert_array_equal(first[0], again[0])
  assert not np.array_equal(first[1], other[1])


def test_the_mixing_stops_with_the_distortions():
  config = small_config(mixup_alpha=0.4, undistorted_final_epochs=0.5)
  x = images().astype(jnp.uint8)
  at = jax.jit(lambda step: mixed_images(x, keys(8), step, config, 10))
  before, after = at(9), at(10)
  assert not np.allclose(before[1], 1)
  np.testing.assert_array_equal(after[0], x)
  np.testing.assert_array_equal(after[1], np.ones(8))
  assert mixed_images(x, keys(8), 0, small_config(), None) == (x, None)


def test_the_training_batch_pairs_each_image_s_partner_with_its_label():
  config = small_config(mixup_alpha=0.4, augment_max_shift=0)
  data = {"image": images(8).astype(jnp.uint8), "label": jnp.arange(8)}
  indices = jnp.array([5, 2, 7, 0])
  batch = training_batch(data, indices, keys(4), 0, config, None)
  np.testing.assert_array_equal(batch["label"], [5, 2, 7, 0])
  np.testing.assert_array_equal(batch["mix_label"], [2, 5, 0, 7])
  grey = data["image"][indices, 0, 0, 0].astype(np.float32)
  w, partner = batch["mix_weight"], grey[np.array([1, 0, 3, 2])]
  expected = input_pipeline.normalize(w * grey + (1 - w) * partner, config.dataset)
  np.testing.assert_allclose(batch["image"][:, 0, 0, 0], expected, rtol=1e-5)


def test_a_mixed_batch_s_loss_is_the_cross_entropy_of_the_mixed_targets():
  state = train_state.create_train_state(small_config(), total_steps=10)
  # The head starts at zero, which would make every target's loss log(10): give it weights.
  head = jax.random.normal(jax.random.PRNGKey(1), state.params["head"]["kernel"].shape)
  state = state.replace(params={**state.params, "head": {**state.params["head"], "kernel": head}})
  x = jax.random.uniform(jax.random.PRNGKey(2), (6, 28, 28, 1))
  logits = state.apply_fn({"params": state.params}, x, train=True,
                          rngs={"dropout": jax.random.PRNGKey(0)})
  # Each partner's label is the model's prediction, each own label another.
  partners = jnp.argmax(logits, -1)
  labels = (partners + 1) % 10
  weights = jnp.array([1.0, 0.9, 0.5, 0.3, 0.1, 1.0])
  batch = {"image": x, "label": labels, "mix_label": partners, "mix_weight": weights}
  step = jax.jit(functools.partial(steps.train_step, label_smoothing=0.1))
  _, metrics = step(state, batch, jax.random.PRNGKey(0))
  onehot = functools.partial(jax.nn.one_hot, num_classes=10)
  targets = weights[:, None] * onehot(labels) + (1 - weights[:, None]) * onehot(partners)
  expected = optax.softmax_cross_entropy(logits, optax.smooth_labels(targets, 0.1)).mean()
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  # Accuracy counts the label of each image's larger share (its own at a weight of 0.5): here
  # the two images that are mostly their partners.
  assert float(metrics["accuracy"]) == pytest.approx(2 / 6)
  _, unmixed = step(state, {"image": x, "label": labels}, jax.random.PRNGKey(0))
  assert abs(float(unmixed["loss"]) - float(metrics["loss"])) > 1e-3


@pytest.mark.parametrize("key, value", [("mixup_alpha", -0.1), ("cutmix_alpha", 11.0)])
def test_an_alpha_out_of_range_is_one_line_naming_it(key, value):
  with pytest.raises(ValueError, match=rf"^{key}={value} must be in \[0, 10\]$"):
    small_config(**{key: value})
