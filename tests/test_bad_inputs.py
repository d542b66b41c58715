"""Bad input to the maths and the model: a one-line error naming it, not a traceback deep in
JAX, and never a silent wrong answer (a misspelt projection taken as the identity, a short
head mask's last row standing for the missing layers, another image size's model)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import attention as A
from vit_jax import models
from vit_jax.model_configs import get_model_config

X = jnp.ones((2, 5, 8))
W = {"kernel": jnp.ones((8, 8))}
TO_OUT = {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}


@pytest.mark.parametrize("weights,message", [
    ({"to_Q": W, "to_out": TO_OUT}, "weights['to_Q'] is not one of 'to_qkv', 'to_q', 'to_k'"),
    ({"to_qkv": {"kernel": jnp.ones((8, 24))}, "to_q": W, "to_out": TO_OUT},
     "weights has 'to_qkv' and 'to_q': the fused projection or the separate ones, not both"),
])
def test_projections_must_be_named_as_self_attention_reads_them(weights, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    A.self_attention(X, weights, num_heads=2)


@pytest.mark.parametrize("call,message", [
    (lambda: A.split_heads(X, 0), "num_heads=0 must be a positive integer"),
    (lambda: A.patchify(jnp.ones((1, 8, 8, 1)), 0), "patch_size=0 must be a positive integer"),
    (lambda: A.patchify(jnp.ones((1, 8, 8, 1)), -4), "patch_size=-4 must be a positive integer"),
    (lambda: A.patchify(jnp.ones((1, 8, 8, 1)), 4.0), "patch_size=4.0 must be a positive integer"),
])
def test_sizes_that_are_not_positive_integers_are_one_line(call, message):
  with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
    call()


def test_a_query_that_may_attend_to_no_key_gets_uniform_weights():
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 4, 2))
  mask = jnp.array([[True, False, True, False]] * 3 + [[False] * 4])
  weights = A.attention_weights(q, q, mask)
  np.testing.assert_allclose(weights[0, 0, 3], 0.25, rtol=1e-6)
  assert (weights[0, 0, :3][:, [1, 3]] == 0).all()


CONFIG = get_model_config("testing", num_layers=3)  # 2 heads of 8, 17 tokens, 28 x 28 x 1
IMAGES = jnp.zeros((2, 28, 28, 1))


@pytest.fixture(scope="module")
def variables():
  return models.ViT(CONFIG).init(jax.random.PRNGKey(0), IMAGES)


@pytest.mark.slow
def test_images_of_another_size_or_channel_count_are_refused(variables):
  for images in (jnp.zeros((2, 35, 35, 3)), jnp.zeros((2, 28, 28))):
    with pytest.raises(ValueError, match=r"^images of shape .* are not \(B, 28, 28, 1\) as "
                                         r"model.image_size and model.num_channels say"):
      models.ViT(CONFIG).init(jax.random.PRNGKey(0), images)
  with pytest.raises(ValueError, match=r"images of shape \(2, 35, 35, 3\)"):
    models.ViT(CONFIG).apply(variables, jnp.zeros((2, 35, 35, 3)))


@pytest.mark.parametrize("name,shape,message", [
    ("head_mask", (2, 2), r"head_mask of shape \(2, 2\) is not \(3, 2\) \(num_layers, num_heads\)"),
    ("head_mask", (4, 2), r"head_mask of shape \(4, 2\) is not \(3, 2\)"),
    ("head_means", (2, 2, 50, 8), r"head_means of shape \(2, 2, 50, 8\) is not \(3, 2, 17, 8\) "
                                  r"\(num_layers, num_heads, tokens, head_dim\)"),
])
def test_a_head_mask_of_other_layers_or_heads_is_refused(variables, name, shape, message):
  inputs = {"head_mask": jnp.ones((3, 2)), name: jnp.ones(shape)}
  with pytest.raises(ValueError, match=message):
    models.ViT(CONFIG).apply(variables, IMAGES, **inputs)


def test_a_transposed_low_rank_factor_is_refused_not_reshaped():
  config = get_model_config("testing", qkv="low_rank", qkv_rank=1)
  params = models.ViT(config).init(jax.random.PRNGKey(0), IMAGES)["params"]
  attention = params["encoder"]["block0"]["attention"]
  transposed = {**attention, "to_q_a": attention["to_q_a"].T}  # (H r, D) for (D, H r)
  if transposed["to_q_a"].shape == attention["to_q_a"].shape:
    pytest.skip("a square A: its transpose has the same shape")
  models.projection_weights(attention, "low_rank", config.hidden_size, "")  # the right way round
  with pytest.raises(AssertionError, match="to_q_a|shape"):
    models.projection_weights(transposed, "low_rank", config.hidden_size, "")
