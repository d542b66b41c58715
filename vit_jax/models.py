"""Flax modules that own the ViT's parameters and call the maths in `attention`.

`ViT.apply(variables, images, mutable=["intermediates"])` returns the logits and,
beside them, every layer's attention weights (sown as
`intermediates/.../attention/attention_weights`), so attention maps need no
second forward pass; `attention_maps` stacks them.
"""

from __future__ import annotations

import zlib
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax import attention as A
from vit_jax import kernels
from vit_jax.layer_norm import standardize
from vit_jax.model_configs import QKV_MODES, ModelConfig, gradients_meet_products


def _linear_params(module: nn.Module, d_in: int, features: int, use_bias: bool,
                   kernel_init: Any) -> dict[str, jax.Array]:
  """{'kernel': (d_in, features), 'bias': (features,) if `use_bias`}, owned by `module`."""
  params = {"kernel": module.param("kernel", kernel_init, (d_in, features))}
  if use_bias:
    params["bias"] = module.param("bias", nn.initializers.zeros, (features,))
  return params


class Linear(nn.Module):
  """A learned projection `attention.project`: (B, N, D_in) -> (B, N, features).

  Products in `compute_dtype` (None: float32).
  """
  features: int
  use_bias: bool = True
  kernel_init: Any = nn.initializers.xavier_uniform()
  compute_dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    params = _linear_params(self, x.shape[-1], self.features, self.use_bias, self.kernel_init)
    return A.project(x, **params, compute_dtype=self.compute_dtype)


class LinearWeights(nn.Module):
  """The parameters of a `Linear`, returned rather than applied: for `self_attention`."""
  features: int
  use_bias: bool = True
  kernel_init: Any = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, d_in: int) -> dict[str, jax.Array]:
    return _linear_params(self, d_in, self.features, self.use_bias, self.kernel_init)


class LayerNorm(nn.Module):
  """`layer_norm.standardize`, then a learned per-feature scale and bias: (..., D) -> (..., D).

  The parameters and their initial values are those of `flax.linen.LayerNorm` (`scale`
  ones, `bias` zeros, epsilon 1e-6); the gradient is written out (`layer_norm`).
  """
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (width,))
    bias = self.param("bias", nn.initializers.zeros, (width,))
    return standardize(x, self.epsilon) * scale + bias


class PatchEmbedding(nn.Module):
  """(B, H, W, C) images -> (B, N, D) tokens: patchify, then a linear projection."""
  patch_size: int
  hidden_size: int
  compute_dtype: Any = None
  overlap: int = 0

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    patches = A.patchify(images, self.patch_size, self.overlap)
    return Linear(self.hidden_size, compute_dtype=self.compute_dtype, name="projection")(patches)


class MultiHeadSelfAttention(nn.Module):
  """`attention.self_attention` with learned projections: (B, N, D) -> (B, N, D).

  qkv: 'fused' (one `to_qkv` matrix D -> 3D, then chunked), 'separate' (`to_q`, `to_k`,
  `to_v`), 'identity' (no projection: Q = K = V = x, so head h reads slice h of x), or
  another of `model_configs.QKV_MODES` (`projection_weights` builds each).
  attention_kernel: step 4, `kernels.attend_function`'s 'einsum' (the definition) or 'fused_cpu'.
  """
  num_heads: int
  qkv: str = "fused"
  qkv_bias: bool = False
  compute_dtype: Any = None
  attention_kernel: str = "einsum"
  qkv_rank: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               head_mask: jax.Array | None = None, head_means: jax.Array | None = None
               ) -> jax.Array:
    width = x.shape[-1]
    if self.qkv not in QKV_MODES:
      raise ValueError(f"qkv={self.qkv!r} is not one of {', '.join(map(repr, QKV_MODES))}")
    owned = {name: LinearWeights(features, self.qkv_bias, name=name)(width)
             for name, features in learned_projections(self.qkv, width).items()}
    if self.qkv == "low_rank":
      # Variance 1/D for A and 1/r for B (the head axis is a batch of matrices, not fan-in):
      # each head's A B then starts at 1/D, as a learned D x D matrix does.
      per_head = nn.initializers.lecun_normal(batch_axis=(0,))
      rank, head_dim = self.qkv_rank, width // self.num_heads
      for t in "qkv":
        owned[f"to_{t}_a"] = self.param(f"to_{t}_a", nn.initializers.lecun_normal(),
                                        (width, self.num_heads * rank))
        owned[f"to_{t}_b"] = self.param(f"to_{t}_b", per_head, (self.num_heads, rank, head_dim))
    weights = projection_weights(owned, self.qkv, width, "/".join(self.scope.path))
    weights["to_out"] = LinearWeights(width, name="to_out")(width)
    attend = kernels.attend_function(self.attention_kernel,
                                     gradients_meet_products(self.qkv, self.qkv_bias))
    out, attention_weights = A.self_attention(x, weights, self.num_heads, mask, attend,
                                              self.compute_dtype, head_mask, head_means)
    self.sow("intermediates", "attention_weights", attention_weights)
    return out


def learned_projections(qkv: str, width: int) -> dict[str, int]:
  """The full learned matrices of a `qkv` mode: {name: output width}, input width `width`
  (none for 'low_rank', whose factors are its own, and the unlearned modes)."""
  return {"fused": {"to_qkv": 3 * width}, "separate": {f"to_{t}": width for t in "qkv"},
          "identity_q": {"to_k": width, "to_v": width},
          "identity_k": {"to_q": width, "to_v": width},
          "identity_v": {"to_q": width, "to_k": width},
          "tied_qk": {"to_qk": width, "to_v": width},
          "identity": {}, "low_rank": {}, "frozen_random": {}}[qkv]


def projection_weights(owned: dict[str, Any], qkv: str, width: int, path: str
                       ) -> dict[str, Any]:
  """The projections `attention.self_attention` takes, from a layer's own parameters.

  `owned`: the attention module's parameters (`to_out` is not read); `path`: the module's
  place in the model ('encoder/block0/attention'), which seeds the frozen random projection.
  """
  if qkv == "tied_qk":
    return {"to_q": owned["to_qk"], "to_k": owned["to_qk"], "to_v": owned["to_v"]}
  if qkv == "low_rank":  # per head h: W^h = A^h B^h, A^h (D, r), B^h (r, D/H)
    def kernel(a, b):
      heads, rank, head_dim = b.shape
      chex.assert_shape(a, (width, heads * rank))  # a transposed A would reshape silently
      w = jnp.einsum("dhr,hre->dhe", a.reshape(width, heads, rank), b)
      chex.assert_shape(w, (width, heads, head_dim))
      return w.reshape(width, heads * head_dim)
    return {f"to_{t}": {"kernel": kernel(owned[f"to_{t}_a"], owned[f"to_{t}_b"])}
            for t in "qkv"}
  if qkv == "frozen_random":  # the same numbers at every call: a constant, never trained
    key = jax.random.PRNGKey(zlib.crc32(path.encode()))
    return {"to_qkv": {"kernel": nn.initializers.xavier_uniform()(key, (width, 3 * width))}}
  return {name: owned[name] for name in learned_projections(qkv, width)}


def layer_projections(params: Any, config: ModelConfig, layer: int) -> dict[str, Any]:
  """Layer `layer`'s projections, 'to_out' included, as `self_attention` takes them, from a
  model's `params` (whatever its `qkv` mode): for the instruments that read the weights."""
  attention = params["encoder"][f"block{layer}"]["attention"]
  weights = projection_weights(attention, config.qkv, config.hidden_size,
                               f"encoder/block{layer}/attention")
  return {**weights, "to_out": attention["to_out"]}


class MlpBlock(nn.Module):
  """Linear -> GELU -> dropout -> Linear -> dropout, token-wise."""
  mlp_dim: int
  dropout_rate: float = 0.0
  compute_dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    width = x.shape[-1]
    x = nn.gelu(Linear(self.mlp_dim, compute_dtype=self.compute_dtype, name="fc1")(x))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = Linear(width, compute_dtype=self.compute_dtype, name="fc2")(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

  `drop_path`: stochastic depth, the chance that a residual branch is skipped for an example
  in training (the kept ones scaled by 1 / (1 - drop_path), so its expectation is unchanged).
  """
  config: ModelConfig
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool, head_mask: jax.Array | None = None,
               head_means: jax.Array | None = None) -> jax.Array:
    c = self.config
    # One draw per example, broadcast over its tokens and features: the whole branch goes.
    drop_path = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), name="drop_path")
    y = LayerNorm(name="norm1")(x)
    y = MultiHeadSelfAttention(c.num_heads, c.qkv, c.qkv_bias, c.compute_dtype,
                               c.attention_kernel, c.qkv_rank,
                               name="attention")(y, head_mask=head_mask,
                                                 head_means=head_means)
    y = nn.Dropout(c.dropout_rate)(y, deterministic=deterministic)
    x = x + drop_path(y, deterministic=deterministic)
    y = LayerNorm(name="norm2")(x)
    y = MlpBlock(c.mlp_dim, c.dropout_rate, c.compute_dtype, name="mlp")(y, deterministic)
    return x + drop_path(y, deterministic=deterministic)


def drop_path_rates(config: ModelConfig) -> list[float]:
  """Each block's stochastic depth: from 0 at the first block to `drop_path_rate` at the last,
  linearly (as DeiT and timm do): early blocks, which every later one builds on, drop least."""
  last = max(config.num_layers - 1, 1)
  return [config.drop_path_rate * i / last for i in range(config.num_layers)]


class Encoder(nn.Module):
  """`num_layers` encoder blocks, then a final LayerNorm."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool, head_mask: jax.Array | None = None,
               head_means: jax.Array | None = None) -> jax.Array:
    for i, rate in enumerate(drop_path_rates(self.config)):
      x = EncoderBlock(self.config, rate, name=f"block{i}")(
          x, deterministic, None if head_mask is None else head_mask[i],
          None if head_means is None else head_means[i])
    return LayerNorm(name="norm")(x)


class ViT(nn.Module):
  """Vision Transformer classifier: (B, H, W, C) images -> (B, num_classes) logits.

  `head_mask`: optional (num_layers, num_heads); a head whose entry is 0 is removed (its
  output zeroed before the heads merge), for head-importance studies. `head_means`: optional
  (num_layers, num_heads, N, D/H), the removed heads' outputs instead of zeros
  (mean-ablation; `instruments.head_means`).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               head_mask: jax.Array | None = None, head_means: jax.Array | None = None
               ) -> jax.Array:
    c = self.config
    _check_inputs(c, images, head_mask, head_means)
    if c.compute_dtype == "auto":
      raise ValueError("model.compute_dtype='auto' is chosen when a run starts (vit_jax.auto); "
                       "a model takes 'float32' or 'bfloat16'")
    x = PatchEmbedding(c.patch_size, c.hidden_size, c.compute_dtype, c.patch_overlap,
                       name="patch_embedding")(images)
    if c.classifier == "token":
      cls = self.param("cls_token", nn.initializers.zeros, (1, 1, c.hidden_size))
      x = jnp.concatenate([jnp.tile(cls, (x.shape[0], 1, 1)), x], axis=1)
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                     (1, x.shape[1], c.hidden_size))
    x = nn.Dropout(c.dropout_rate)(x + pos, deterministic=not train)
    x = Encoder(c, name="encoder")(x, deterministic=not train, head_mask=head_mask,
                                   head_means=head_means)
    pooled = x[:, 0] if c.classifier == "token" else x.mean(axis=1)
    # A zero-initialised head starts every class at equal probability.
    head = Linear(c.num_classes, kernel_init=nn.initializers.zeros, compute_dtype=c.compute_dtype,
                  name="head")
    return head(pooled[:, None, :])[:, 0]


def _check_inputs(c: ModelConfig, images: jax.Array, head_mask: jax.Array | None,
                  head_means: jax.Array | None) -> None:
  """Images of another size, or a head mask of other layers or heads (indexing would clamp: a
  short mask's last row would stand for the missing layers), refused in one line."""
  image = (c.image_size, c.image_size, c.num_channels)
  if images.ndim != 4 or images.shape[1:] != image:
    raise ValueError(f"images of shape {images.shape} are not (B, {', '.join(map(str, image))}) "
                     f"as model.image_size and model.num_channels say")
  heads = (c.num_layers, c.num_heads)
  for name, array, shape, axes in (("head_mask", head_mask, heads, ""), ("head_means", head_means,
                                   (*heads, c.num_tokens, c.head_dim), ", tokens, head_dim")):
    if array is not None and array.shape != shape:
      raise ValueError(f"{name} of shape {array.shape} is not {shape} (num_layers, num_heads"
                       f"{axes})")


def attention_maps(intermediates: Any) -> jax.Array:
  """Stacks the sown attention weights: -> (num_layers, B, H, N, N)."""
  encoder = intermediates["encoder"]
  layers = sorted((k for k in encoder if k.startswith("block")), key=lambda k: int(k[5:]))
  return jnp.stack([encoder[k]["attention"]["attention_weights"][0] for k in layers])


def count_params(params: Any) -> int:
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
