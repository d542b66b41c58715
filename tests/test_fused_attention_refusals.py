"""What the fused kernel does not take: shapes it leaves to `attention.attend`, configs that
ask it for them, and masks."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import rand
from test_fused_attention import _uses_kernel

from vit_jax import attention as A
from vit_jax import kernels, models
from vit_jax.kernels import fused_attention as F
from vit_jax.model_configs import get_model_config


@pytest.mark.parametrize("shape", [(2, 2, 9, 12),  # head dim 12: not the kernel's
                                   (1, 1, kernels.MAX_TOKENS + 1, 16)])
def test_unsupported_shapes_use_attend(shape):
  q, k, v = (rand(*shape, seed=s) for s in range(3))
  assert not kernels.supports(shape[2], shape[3])
  assert not _uses_kernel(F.attend, q, k, v)
  for got, want in zip(F.attend(q, k, v), A.attend(q, k, v), strict=True):
    np.testing.assert_allclose(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("overrides,message", [
    ({"hidden_size": 24}, "not 12 and 17"),          # heads of 12
    ({"patch_size": 2}, "not 16 and 197"),           # 196 patches + the class token
    ({"attention_kernel": "xla"}, "is not one of 'auto', 'einsum', 'fused_cpu'"),
])
def test_config_rejects_what_the_kernel_cannot_do(overrides, message):
  fields = {"hidden_size": 32, "num_heads": 2, "attention_kernel": "fused_cpu", **overrides}
  with pytest.raises(ValueError, match=re.escape(message)) as error:
    get_model_config("testing", **fields)
  assert "attention_kernel" in str(error.value) and "\n" not in str(error.value)


def test_mask_is_rejected_by_the_fused_module():
  module = models.MultiHeadSelfAttention(2, attention_kernel="fused_cpu")
  x = rand(1, 5, 32)
  with pytest.raises(ValueError, match="takes no mask"):
    module.init(jax.random.PRNGKey(0), x, mask=jnp.ones((5, 5), bool))
