"""LayerNorm: the closed-form gradient against autodiff, and the module against flax's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.layer_norm import standardize


def reference_standardize(x, epsilon=1e-6):
  """Differentiated by autodiff: the independent reference for the hand-written gradient."""
  centred = x - x.mean(-1, keepdims=True)
  return centred / jnp.sqrt((centred**2).mean(-1, keepdims=True) + epsilon)


def rows(seed=0, shape=(3, 7, 32)):
  key = jax.random.PRNGKey(seed)
  # An offset and a spread per row, so that neither the mean nor the variance is trivial.
  row = shape[:-1] + (1,)
  offset, spread, x = (jax.random.normal(k, s) for k, s in zip(
      jax.random.split(key, 3), [row, row, shape], strict=True))
  return 3 * offset + jnp.exp(spread) * x


def test_standardize_matches_numpy_in_float64():
  x = rows()
  expected = np.asarray(x, np.float64)
  expected = (expected - expected.mean(-1, keepdims=True)) / np.sqrt(
      expected.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(standardize(x), expected, rtol=1e-5, atol=1e-5)
  # Every row comes out with mean 0 and variance 1 (up to epsilon).
  np.testing.assert_allclose(standardize(x).mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(standardize(x).var(-1), 1, atol=1e-3)


@pytest.mark.parametrize("epsilon", [1e-6, 0.5])
def test_hand_written_gradient_equals_autodiff(epsilon):
  x, cotangent = rows(0), rows(1)
  got = jax.grad(lambda x: jnp.sum(standardize(x, epsilon) * cotangent))(x)
  expected = jax.grad(lambda x: jnp.sum(reference_standardize(x, epsilon) * cotangent))(x)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
  # Shifting a row leaves the output alone, so the gradient of every row sums to zero.
  np.testing.assert_allclose(got.sum(-1), 0, atol=1e-4)


def test_second_derivatives_in_reverse_mode_and_no_forward_mode():
  x, direction = rows(0, (2, 16)), rows(2, (2, 16))

  def hessian_vector_product(f):
    return jax.grad(lambda x: jnp.vdot(jax.grad(lambda x: jnp.sum(f(x) ** 3))(x), direction))(x)

  np.testing.assert_allclose(hessian_vector_product(standardize),
                             hessian_vector_product(reference_standardize),
                             rtol=1e-3, atol=1e-3)
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(standardize, (x,), (direction,))


def test_layer_norm_module_equals_flax_layer_norm_in_values_and_gradients():
  x, cotangent = rows(0), rows(1)
  ours, flax_ln = models.LayerNorm(), nn.LayerNorm()
  params = flax_ln.init(jax.random.PRNGKey(0), x)
  assert jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.PRNGKey(0), x)) == \
      jax.tree_util.tree_map(jnp.shape, params)
  # Learned-looking scale and bias, the same for both.
  params = {"params": {"scale": 1 + rows(3, (32,)) / 4, "bias": rows(4, (32,))}}

  def loss(module):
    return lambda params, x: jnp.sum(module.apply(params, x) * cotangent)

  # Flax computes the variance in one pass, E[x²] - E[x]², which loses digits on rows with a
  # large mean: hence 1e-4 here, where the float64 test above holds ours to 1e-5.
  np.testing.assert_allclose(ours.apply(params, x), flax_ln.apply(params, x), rtol=1e-4,
                             atol=1e-4)
  got = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  expected = jax.grad(loss(flax_ln), argnums=(0, 1))(params, x)
  jax.tree_util.tree_map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4),
                         got, expected)
