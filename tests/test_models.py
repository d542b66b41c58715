"""The Flax modules: agreement with Flax's own attention, invariants, the config registry."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.model_configs import MODEL_CONFIGS, ModelConfig, get_model_config

RTOL = ATOL = 1e-5


def rand(*shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_attention_matches_flax_multi_head_dot_product_attention():
  b, n, d, h = 2, 6, 16, 4
  x = rand(b, n, d)
  ours = models.MultiHeadSelfAttention(num_heads=h, qkv="fused")
  params = ours.init(jax.random.PRNGKey(0), x)["params"]
  w_q, w_k, w_v = np.split(np.asarray(params["to_qkv"]["kernel"]), 3, axis=1)
  w_out, b_out = params["to_out"]["kernel"], params["to_out"]["bias"]
  b_out = b_out + rand(d, seed=5)  # a non-zero bias, so the mapping of biases is tested too
  params = {**params, "to_out": {"kernel": w_out, "bias": b_out}}

  theirs = nn.MultiHeadDotProductAttention(num_heads=h, qkv_features=d, out_features=d)
  zeros = jnp.zeros((h, d // h))
  their_params = {
      "query": {"kernel": w_q.reshape(d, h, d // h), "bias": zeros},
      "key": {"kernel": w_k.reshape(d, h, d // h), "bias": zeros},
      "value": {"kernel": w_v.reshape(d, h, d // h), "bias": zeros},
      "out": {"kernel": np.asarray(w_out).reshape(h, d // h, d), "bias": b_out},
  }
  expected = theirs.apply({"params": their_params}, x, deterministic=True)
  got = ours.apply({"params": params}, x)
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_fused_qkv_equals_separate_qkv_with_concatenated_weights():
  x = rand(2, 5, 12)
  separate = models.MultiHeadSelfAttention(num_heads=3, qkv="separate")
  p = separate.init(jax.random.PRNGKey(1), x)["params"]
  fused_params = {
      "to_qkv": {"kernel": jnp.concatenate([p[f"to_{t}"]["kernel"] for t in "qkv"], axis=1)},
      "to_out": p["to_out"],
  }
  fused = models.MultiHeadSelfAttention(num_heads=3, qkv="fused")
  np.testing.assert_allclose(fused.apply({"params": fused_params}, x),
                             separate.apply({"params": p}, x), rtol=RTOL, atol=ATOL)


def test_qkv_bias_is_off_by_default_and_on_when_asked():
  x = rand(1, 4, 8)
  plain = models.MultiHeadSelfAttention(num_heads=2).init(jax.random.PRNGKey(0), x)["params"]
  assert set(plain["to_qkv"]) == {"kernel"}
  biased = models.MultiHeadSelfAttention(num_heads=2, qkv_bias=True).init(
      jax.random.PRNGKey(0), x)["params"]
  assert biased["to_qkv"]["bias"].shape == (24,)


def expected_param_count(c: ModelConfig) -> int:
  """Counted from the architecture, independently of the modules."""
  d, p = c.hidden_size, c.patch_size + 2 * c.patch_overlap
  tokens = c.num_patches + (c.classifier == "token")
  qkv = {"fused": 3 * d * d, "separate": 3 * d * d, "identity": 0}[c.qkv]
  qkv += 3 * d * c.qkv_bias * (c.qkv != "identity")
  block = qkv + (d * d + d) + (d * c.mlp_dim + c.mlp_dim) + (c.mlp_dim * d + d) + 4 * d
  return ((p * p * c.num_channels * d + d) + (d if c.classifier == "token" else 0)
          + tokens * d + c.num_layers * block + 2 * d + (d * c.num_classes + c.num_classes))


PINNED_PARAM_COUNTS = {"testing": 3_466, "seed": 204_810, "fast": 538_634, "sprint": 138_250,
                       "best": 802_826,
                       "wide": 2_386_954}


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_parameter_counts_are_pinned(name):
  config = MODEL_CONFIGS[name]
  # Shapes are all a count needs: traced, never compiled.
  params = jax.eval_shape(models.ViT(config).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 28, 28, 1)))["params"]
  assert models.count_params(params) == PINNED_PARAM_COUNTS[name]
  assert models.count_params(params) == expected_param_count(config)


def test_every_registered_config_is_pinned():
  assert set(PINNED_PARAM_COUNTS) == set(MODEL_CONFIGS)


@pytest.mark.parametrize("overrides", [
    {}, {"classifier": "gap"}, {"qkv": "separate", "qkv_bias": True}, {"qkv": "identity"},
    {"patch_size": 4, "num_heads": 1}, {"patch_size": 4, "patch_overlap": 1},
])
def test_vit_output_shapes_and_attention_intermediates(overrides):
  config = get_model_config("testing", **overrides)
  model = models.ViT(config)
  images = rand(3, 28, 28, 1)
  variables = model.init(jax.random.PRNGKey(0), images)
  assert models.count_params(variables["params"]) == expected_param_count(config)
  logits, state = model.apply(variables, images, mutable=["intermediates"])
  assert logits.shape == (3, 10)
  maps = models.attention_maps(state["intermediates"])
  tokens = config.num_patches + (config.classifier == "token")
  assert maps.shape == (config.num_layers, 3, config.num_heads, tokens, tokens)
  np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_dropout_acts_only_in_training():
  config = get_model_config("testing", dropout_rate=0.5)
  model = models.ViT(config)
  images = rand(2, 28, 28, 1)
  variables = model.init(jax.random.PRNGKey(0), images)
  # The zero-initialised head would hide everything: give it weights.
  params = jax.tree_util.tree_map(lambda p: p, variables["params"])
  params["head"] = {"kernel": rand(16, 10), "bias": rand(10, seed=1)}
  v = {"params": params}
  training = jax.jit(lambda key: model.apply(v, images, train=True, rngs={"dropout": key}))
  assert not np.allclose(training(jax.random.PRNGKey(1)), training(jax.random.PRNGKey(2)))
  # Outside training the model is the same function as one without dropout.
  without = models.ViT(dataclasses.replace(config, dropout_rate=0.0))
  np.testing.assert_array_equal(jax.jit(model.apply)(v, images),
                                jax.jit(without.apply)(v, images))


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_parameters_and_gradients_and_close_logits():
  f32 = get_model_config("testing", num_layers=2, qkv="separate")
  bf16 = dataclasses.replace(f32, compute_dtype="bfloat16")
  images = rand(4, 28, 28, 1)
  variables = models.ViT(f32).init(jax.random.PRNGKey(0), images)
  params = dict(variables["params"])
  params["head"] = {"kernel": rand(16, 10), "bias": rand(10, seed=1)}  # not all zero

  @functools.partial(jax.jit, static_argnums=1)
  def loss(params, config):
    return models.ViT(config).apply({"params": params}, images).sum()

  expected, got = loss(params, f32), loss(params, bf16)
  assert got.dtype == jnp.float32
  assert got != expected  # the products really were rounded
  np.testing.assert_allclose(got, expected, rtol=2e-2)
  gradient = jax.jit(jax.grad(loss), static_argnums=1)
  grads = gradient(params, bf16)
  for leaf, ref in zip(jax.tree_util.tree_leaves(grads),
                       jax.tree_util.tree_leaves(gradient(params, f32)), strict=True):
    assert leaf.dtype == jnp.float32
    np.testing.assert_allclose(leaf, ref, rtol=0.1, atol=0.05 * float(np.abs(ref).max()))


@pytest.mark.parametrize("overrides,message", [
    ({"num_heads": 3}, "num_heads=3 does not divide hidden_size=16"),
    ({"patch_size": 5}, "patch_size=5 does not divide image_size=28"),
    ({"hidden_size": 0}, "hidden_size=0 must be a positive integer"),
    ({"num_layers": -1}, "num_layers=-1 must be a positive integer"),
    ({"qkv": "shared"}, "qkv='shared' is not one of"),
    ({"classifier": "max"}, "classifier='max' is not one of"),
    ({"dropout_rate": 1.5}, "dropout_rate=1.5 must be in"),
    ({"num_heads": 2.0}, "num_heads=2.0 has type float"),
    ({"heads": 2}, "model.heads is not a known key"),
    ({"compute_dtype": "float16"}, "model.compute_dtype='float16' is not one of"),
])
def test_bad_model_configs_are_rejected_with_one_line(overrides, message):
  with pytest.raises(ValueError, match=message) as info:
    get_model_config("testing", **overrides)
  assert "\n" not in str(info.value)


def test_unknown_model_name_is_rejected():
  with pytest.raises(ValueError, match="model name='huge' is not registered"):
    get_model_config("huge")



def test_drop_path_skips_whole_branches_per_example_in_training_only():
  config = get_model_config("testing", hidden_size=16)
  block = models.EncoderBlock(config, drop_path=0.5)
  x = rand(400, 5, 16)
  variables = block.init(jax.random.PRNGKey(0), x, deterministic=True)
  # In evaluation it is the block without stochastic depth.
  plain = models.EncoderBlock(config, drop_path=0.0).apply(variables, x, deterministic=True)
  np.testing.assert_array_equal(block.apply(variables, x, deterministic=True), plain)
  out = jax.jit(lambda v, x: block.apply(v, x, deterministic=False,
                                         rngs={"dropout": jax.random.PRNGKey(1)}))(variables, x)
  same = np.asarray(out) == x
  unchanged = same.all(axis=(1, 2))  # both branches skipped
  # Each example whole: every number of it changed or none (a token-wise or feature-wise
  # mask would leave some tokens or features of an example as they were, others not).
  assert np.all(unchanged | (~same).all(axis=(1, 2)))
  assert 0.15 < unchanged.mean() < 0.35, unchanged.mean()  # 0.5 x 0.5 of the examples


def test_drop_path_rises_linearly_with_depth_and_leaves_the_parameters_alone():
  config = get_model_config("seed", drop_path_rate=0.1)
  np.testing.assert_allclose(models.drop_path_rates(config), [0.0, 0.02, 0.04, 0.06, 0.08, 0.1])
  params = jax.eval_shape(models.ViT(config).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 28, 28, 1)))["params"]
  assert models.count_params(params) == PINNED_PARAM_COUNTS["seed"]
  with pytest.raises(ValueError, match=r"model.drop_path_rate=1.0 must be in \[0, 1\)"):
    get_model_config("seed", drop_path_rate=1.0)
