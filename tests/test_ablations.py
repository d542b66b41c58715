"""The finer Q/K/V ablations (`model.qkv`): parameter counts, what each computes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import attention as A
from vit_jax import models
from vit_jax.model_configs import get_model_config

IMAGES = jnp.zeros((1, 28, 28, 1))
# The seed shape (width 64, 4 heads of 16, depth 6): 204,810 with learned fused projections;
# by hand: a learned D x D matrix is 4,096 a layer, a rank-4 factor pair per head 64*4 + 4*16.
PINNED = {"identity": 131_082, "identity_q": 180_234, "identity_k": 180_234,
          "identity_v": 180_234, "tied_qk": 180_234, "low_rank": 204_810 - 6 * (12_288 - 3_840),
          "frozen_random": 131_082}


def init(qkv, **overrides):
  """The seed shape cut to two layers (what these tests read), and its parameters."""
  config = get_model_config("seed", qkv=qkv, num_layers=2, **overrides)
  return config, models.ViT(config).init(jax.random.PRNGKey(0), IMAGES)["params"]


@pytest.mark.parametrize("qkv", sorted(PINNED))
def test_parameter_counts_are_pinned(qkv):
  config = get_model_config("seed", qkv=qkv, qkv_rank=4 if qkv == "low_rank" else None)
  shapes = jax.eval_shape(models.ViT(config).init, jax.random.PRNGKey(0), IMAGES)
  assert models.count_params(shapes) == PINNED[qkv]


def separate_with_identity(weights, width, t):
  return {**weights, f"to_{t}": {"kernel": jnp.eye(width)}}


@pytest.mark.slow
@pytest.mark.parametrize("t", "qkv")
def test_an_identity_projection_is_a_learned_one_equal_to_the_identity(t):
  config, params = init(f"identity_{t}")
  weights = models.layer_projections(params, config, 0)
  assert f"to_{t}" not in weights
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 50, 64))
  out, _ = A.self_attention(x, weights, 4)
  expected, _ = A.self_attention(x, separate_with_identity(weights, 64, t), 4)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_tied_queries_and_keys_share_one_matrix():
  config, params = init("tied_qk")
  weights = models.layer_projections(params, config, 1)
  assert weights["to_q"] is weights["to_k"] and "to_qk" in params["encoder"]["block1"][
      "attention"]
  # The module attends with scores x W (x W)^T / sqrt(d), from its one matrix.
  module = models.MultiHeadSelfAttention(4, "tied_qk")
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 50, 64))
  variables = module.init(jax.random.PRNGKey(2), x)
  _, state = module.apply(variables, x, mutable=["intermediates"])
  maps = state["intermediates"]["attention_weights"][0]
  q = A.split_heads(A.project(x, variables["params"]["to_qk"]["kernel"]), 4)
  scores = jnp.einsum("bhnd,bhmd->bhnm", q, q) / 4.0  # heads of 16
  np.testing.assert_allclose(maps, jax.nn.softmax(scores, axis=-1), rtol=1e-5, atol=1e-6)


def test_low_rank_projections_have_the_rank_asked_for_per_head():
  config, params = init("low_rank", qkv_rank=3)
  kernel = np.asarray(models.layer_projections(params, config, 0)["to_k"]["kernel"])
  for head in range(4):
    assert np.linalg.matrix_rank(kernel[:, 16 * head:16 * (head + 1)], tol=1e-5) == 3


@pytest.mark.parametrize("rank", [4, 16])
def test_low_rank_heads_start_at_the_scale_of_a_learned_matrix(rank):
  """Each head's A B starts with the weights' spread of `separate`'s D x D matrices
  (variance 1/D), whatever the rank, so a rank study does not also change the start."""
  config, params = init("low_rank", qkv_rank=rank)
  separate_config, separate = init("separate")
  low = models.layer_projections(params, config, 0)["to_q"]["kernel"]
  full = models.layer_projections(separate, separate_config, 0)["to_q"]["kernel"]
  assert float(np.std(low)) == pytest.approx(float(np.std(full)), rel=0.15)
  assert float(np.std(full)) == pytest.approx(64 ** -0.5, rel=0.05)


def test_frozen_random_projections_are_fixed_numbers_out_of_reach_of_training(monkeypatch):
  config, params = init("frozen_random")
  assert "to_qkv" not in params["encoder"]["block0"]["attention"]
  first = models.layer_projections(params, config, 0)["to_qkv"]["kernel"]
  other = models.layer_projections(params, config, 1)["to_qkv"]["kernel"]
  assert not np.allclose(first, other)  # each layer its own
  reseeded = models.ViT(config).init(jax.random.PRNGKey(5), IMAGES)["params"]
  np.testing.assert_array_equal(  # not drawn from the model's seed: fixed
      models.layer_projections(reseeded, config, 0)["to_qkv"]["kernel"], first)
  # The model computes with exactly the numbers the instruments read.
  used, self_attention = [], A.self_attention

  def recording(x, weights, *args):
    used.append(weights["to_qkv"]["kernel"])
    return self_attention(x, weights, *args)

  monkeypatch.setattr(models.A, "self_attention", recording)
  models.ViT(config).apply({"params": params}, IMAGES)
  assert len(used) == 2
  for layer_used, read in zip(used, (first, other), strict=True):
    np.testing.assert_array_equal(layer_used, read)


@pytest.mark.parametrize("overrides, message", [
    (dict(qkv="low_rank"), "qkv_rank=None must be an integer from 1 to head_dim=16"),
    (dict(qkv="low_rank", qkv_rank=17), "qkv_rank=17 must be an integer from 1 to head_dim"),
    (dict(qkv="fused", qkv_rank=4), "qkv_rank=4 applies to qkv='low_rank' only"),
    (dict(qkv="frozen_random", qkv_bias=True), "qkv_bias=True is not available with"),
    (dict(qkv="tied_kv"), "qkv='tied_kv' is not one of 'fused'"),
])
def test_impossible_ablations_are_one_line(overrides, message):
  with pytest.raises(ValueError, match=message):
    get_model_config("seed", **overrides)
