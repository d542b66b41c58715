# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Multi-head attention, one step at a time, on one MNIST digit
#
# This notebook follows one test digit through the first attention layer of the shipped
# `seed` ViT (`pretrained/mnist_seed`: patches of 4x4, width 64, 4 heads of 16, depth 6),
# with the pure functions of `vit_jax/attention.py`, printing every tensor's shape:
# patchify and embed, then the six steps: **project** (the fused `to_qkv`), **chunk** into
# Q, K, V, **split heads**, **attend**, **merge heads**, **project out** (`to_out`). Then it
# checks that the Flax module computes the same thing, and runs the whole model: its
# prediction and its attention maps.
#
# It is the paired `.py` of a Jupyter notebook (jupytext): `jupytext --to ipynb
# notebooks/walkthrough.py` makes the `.ipynb`; the tests run it top to bottom.

# %%
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

REPO = Path.cwd() if (Path.cwd() / "vit_jax").is_dir() else Path.cwd().parent
sys.path.insert(0, str(REPO))
from vit_jax import attention as A  # noqa: E402
from vit_jax import inference, input_pipeline, mnist_source, models  # noqa: E402
from vit_jax.workdir import read_config  # noqa: E402

WORKDIR = Path(os.environ.get("VIT_JAX_WALKTHROUGH_WORKDIR", REPO / "pretrained" / "mnist_seed"))
config = inference.resolved_config(read_config(WORKDIR), WORKDIR)
params = inference.restore_state(config, WORKDIR).params
print(config.model)

# %% [markdown]
# ## One digit, as the model sees it
# The test split's first image, scaled and normalised as in training.

# %%
images, labels = mnist_source.load_split("mnist", "test", idx_dir=config.idx_dir)
digit, label = images[:1], int(labels[0])
x_image = input_pipeline.normalize(digit, "mnist")
print("image", digit.shape, digit.dtype, "label", label, "-> normalised", x_image.shape)
plt.imshow(digit[0, ..., 0], cmap="gray")
plt.title(f"label {label}")
plt.show()

# %% [markdown]
# ## Patches, linearly projected into embeddings
# `patchify` cuts the 28x28 image into 7x7 = 49 patches of 4x4 pixels, each flattened to 16
# numbers; the patch embedding projects each to the width, 64. A class token is put in front
# and the position embeddings added: 50 tokens of 64, the x (B, N, D) of the design.

# %%
patches = A.patchify(x_image, config.model.patch_size, config.model.patch_overlap)
print("patches", patches.shape)
embedding = params["patch_embedding"]["projection"]
tokens = A.project(patches, embedding["kernel"], embedding["bias"])
print("patch embeddings", tokens.shape)
cls = jnp.tile(params["cls_token"], (1, 1, 1))
x = jnp.concatenate([cls, tokens], axis=1) + params["pos_embedding"]
print("x (B, N, D)", x.shape)

# %% [markdown]
# ## Into the first encoder block
# The block normalises x (pre-LayerNorm) before attention; the LayerNorm is the module's.

# %%
block = params["encoder"]["block0"]
layer_norm = models.LayerNorm()
y = layer_norm.apply({"params": block["norm1"]}, x)
print("LayerNorm(x)", y.shape)

# %% [markdown]
# ## Step 1, project: one fused `to_qkv` layer, D -> 3D, no bias

# %%
weights = block["attention"]
print("to_qkv kernel", weights["to_qkv"]["kernel"].shape, "bias" in weights["to_qkv"])
qkv = A.project(y, weights["to_qkv"]["kernel"])
print("qkv", qkv.shape)

# %% [markdown]
# ## Step 2, chunk into Q, K and V

# %%
q, k, v = A.chunk_qkv(qkv)
print("q", q.shape, "k", k.shape, "v", v.shape)

# %% [markdown]
# ## Step 3, split heads: reshape (B, N, H, D/H), transpose (B, H, N, D/H)

# %%
heads = config.model.num_heads
qh, kh, vh = (A.split_heads(t, heads) for t in (q, k, v))
print("per head", qh.shape)

# %% [markdown]
# ## Step 4, attend: softmax(Q Kᵀ / sqrt(D/H)) V, per head
# Each row of the weights is one query's distribution over the 50 keys. Below, head 0's
# weights from the class token to the 49 patches, drawn on the patch grid.

# %%
out, attention_weights = A.attend(qh, kh, vh)
print("attention weights", attention_weights.shape, "out", out.shape)
print("rows sum to 1:", bool(jnp.allclose(attention_weights.sum(-1), 1.0, atol=1e-5)))
grid = config.model.image_size // config.model.patch_size
fig, axes = plt.subplots(1, heads + 1, figsize=(3 * (heads + 1), 3))
axes[0].imshow(digit[0, ..., 0], cmap="gray")
axes[0].set_title("digit")
for h in range(heads):
  axes[h + 1].imshow(np.asarray(attention_weights[0, h, 0, 1:]).reshape(grid, grid))
  axes[h + 1].set_title(f"layer 0, head {h}: class token")
plt.show()

# %% [markdown]
# ## Step 5, merge heads: transpose (B, N, H, D/H), reshape (B, N, D)

# %%
merged = A.merge_heads(out)
print("merged", merged.shape)
print("split then merge is the identity:", bool(jnp.array_equal(A.merge_heads(qh), q)))

# %% [markdown]
# ## Step 6, project out: `to_out`, D -> D

# %%
attended = A.project_out(merged, weights["to_out"]["kernel"], weights["to_out"]["bias"])
print("to_out", attended.shape)

# %% [markdown]
# ## The same through the Flax module
# `MultiHeadSelfAttention` owns these parameters and calls the same functions
# (`attention.self_attention`); its output matches the steps above.

# %%
module = models.MultiHeadSelfAttention(heads, config.model.qkv, config.model.qkv_bias)
from_module = module.apply({"params": weights}, y)
print("module output", from_module.shape, "largest difference",
      float(jnp.abs(from_module - attended).max()))
assert jnp.allclose(from_module, attended, atol=1e-5)

# %% [markdown]
# ## The whole model: a prediction and every layer's attention
# One forward pass returns the logits and, beside them, the attention weights each layer
# sowed; no second pass is needed for the maps.

# %%
model = models.ViT(config.model)
logits, variables = jax.jit(lambda p, im: model.apply({"params": p}, im,
                                                      mutable=["intermediates"]))(params, x_image)
maps = models.attention_maps(variables["intermediates"])
probabilities = jax.nn.softmax(logits, axis=-1)[0]
print("logits", logits.shape, "maps (layers, B, heads, N, N)", maps.shape)
print(f"predicted {int(probabilities.argmax())} with p={float(probabilities.max()):.3f}; "
      f"label {label}")
assert jnp.allclose(maps[0], attention_weights, atol=1e-5)  # layer 0 is the one built above

# %%
layers = maps.shape[0]
fig, axes = plt.subplots(heads, layers, figsize=(2 * layers, 2 * heads))
for layer in range(layers):
  for h in range(heads):
    axes[h, layer].imshow(np.asarray(maps[layer, 0, h, 0, 1:]).reshape(grid, grid))
    axes[h, layer].set_xticks([])
    axes[h, layer].set_yticks([])
    if h == 0:
      axes[h, layer].set_title(f"layer {layer}")
  axes[0, 0].set_ylabel("head 0")
fig.suptitle("class token's attention to the patches, every layer and head")
plt.show()
