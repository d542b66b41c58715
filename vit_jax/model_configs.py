"""The registry of named ViT shapes, each pinned by its parameter count in tests.

    >>> get_model_config("seed", num_heads=8)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

from vit_jax import kernels
from vit_jax.schema import check_types, from_mapping, require

ComputeDtype = Literal["auto", "float32", "bfloat16"]  # 'auto': chosen when a run starts
QkvMode = Literal["fused", "separate", "identity", "identity_q", "identity_k", "identity_v",
                  "tied_qk", "low_rank", "frozen_random"]
AttentionKernel = Literal["auto", "einsum", "fused_cpu"]  # 'auto', then `kernels.KERNELS`
COMPUTE_DTYPES, QKV_MODES = get_args(ComputeDtype), get_args(QkvMode)


def gradients_meet_products(qkv: str, qkv_bias: bool) -> bool:
  """Whether the gradients of Q, K and V each go straight into a product (so a bfloat16
  model's fused kernel may round them itself): not where one is the tokens themselves (the
  `identity` modes) or passes a bias on the way."""
  return not qkv.startswith("identity") and not qkv_bias


# The modes whose Q, K and V are chunked out of one (D, 3 D) product, `to_qkv`: the fused
# kernel reads them in place there, and concatenates them where they come apart.
FUSED_QKV_MODES = ("fused", "frozen_random")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The shape of a ViT. Validated on construction; a bad field raises ValueError.

  qkv chooses how queries, keys and values are made from the tokens (`QKV_MODES`):
  'fused' (one `to_qkv` matrix D -> 3D, then chunk), 'separate' (W_Q, W_K, W_V), and the
  ablations: 'identity' (Q = K = V = the tokens: no projection), 'identity_q',
  'identity_k', 'identity_v' (that one is the tokens, the others learned), 'tied_qk'
  (W_Q = W_K, learned), 'low_rank' (each head's W = A B of rank `qkv_rank`) and
  'frozen_random' (a fixed random `to_qkv`, initialised and never trained: no parameters).

  compute_dtype 'bfloat16' is mixed precision: parameters, LayerNorm, softmax and GELU
  stay float32, every matrix product takes bfloat16 operands and accumulates in float32
  (`attention.products`; the fused kernel rounds its own where its build has AVX-512
  BF16, and keeps them float32 elsewhere). It
  leaves the parameter count alone. It pays on hardware with bfloat16 matmul units (GPUs,
  TPUs, CPUs with AVX-512 BF16 or AMX); elsewhere XLA emulates the products, slower than
  float32. 'auto' is resolved when a run starts (`vit_jax.auto`): bfloat16 where the
  hardware has such units, else float32.

  attention_kernel chooses the implementation of step 4, `attention.attend`
  (`vit_jax.kernels`): 'einsum' is the pure functions, the definition, on any platform;
  'fused_cpu' computes each head's two products and softmax as one C++ kernel on CPUs
  (its softmax in float32, a head dim in `kernels.HEAD_DIMS`, at most `kernels.MAX_TOKENS` tokens;
  first derivatives only); 'auto' is resolved when a run starts (`vit_jax.auto`): 'fused_cpu'
  where the kernel builds and is measurably faster than 'einsum' on this machine for this
  shape, else 'einsum'. The choice changes no parameter, only the rounding.

  With 'einsum' the model differentiates in reverse mode, also twice (`jax.grad` of
  `jax.grad`), but not in forward mode (`jax.jvp`, `jax.jacfwd`): LayerNorm's gradient is
  written out by hand (`vit_jax.layer_norm`), as are the low-precision products'.
  """
  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  num_classes: int = 10
  image_size: int = 28
  num_channels: int = 1
  classifier: Literal["token", "gap"] = "token"
  # Pixels each patch reaches past its patch_size cell on every side (`attention.patchify`):
  # neighbouring patches share borders; the token count stays (image_size / patch_size)^2.
  patch_overlap: int = 0
  qkv: QkvMode = "fused"
  qkv_bias: bool = False
  # qkv='low_rank': each head's W_Q, W_K and W_V are A B with A (D, r), B (r, D/H): r here.
  qkv_rank: int | None = None
  dropout_rate: float = 0.0
  # Stochastic depth: in training, each example skips a block's residual branches with this
  # chance at the last block, less at earlier ones (`models.drop_path_rates`); 0: off.
  drop_path_rate: float = 0.0
  compute_dtype: ComputeDtype = "float32"
  attention_kernel: AttentionKernel = "einsum"

  def __post_init__(self):
    check_types(self)  # then what the types cannot say
    for key in ("patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim",
                "num_classes", "image_size", "num_channels"):
      value = getattr(self, key)
      require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
              key, value, "must be a positive integer")
    require(isinstance(self.patch_overlap, int) and not isinstance(self.patch_overlap, bool)
            and 0 <= self.patch_overlap <= self.patch_size, "patch_overlap",
            self.patch_overlap, f"must be an integer from 0 to patch_size={self.patch_size}")
    require(self.hidden_size % self.num_heads == 0, "num_heads", self.num_heads,
            f"does not divide hidden_size={self.hidden_size}")
    require(self.image_size % self.patch_size == 0, "patch_size", self.patch_size,
            f"does not divide image_size={self.image_size}")
    if self.qkv == "low_rank":
      require(isinstance(self.qkv_rank, int) and 1 <= self.qkv_rank <= self.head_dim,
              "qkv_rank", self.qkv_rank,
              f"must be an integer from 1 to head_dim={self.head_dim} for qkv='low_rank'")
    else:
      require(self.qkv_rank is None, "qkv_rank", self.qkv_rank,
              f"applies to qkv='low_rank' only, not qkv={self.qkv!r}")
    require(not self.qkv_bias or self.qkv not in ("identity", "low_rank", "frozen_random"),
            "qkv_bias", self.qkv_bias, f"is not available with qkv={self.qkv!r}")
    for key in ("dropout_rate", "drop_path_rate"):
      require(0.0 <= getattr(self, key) < 1.0, key, getattr(self, key), "must be in [0, 1)")
    # The rate rises from 0 at the first block, so one block would never drop.
    require(self.drop_path_rate == 0 or self.num_layers > 1, "drop_path_rate",
            self.drop_path_rate, "needs num_layers > 1 (the first block never drops)")
    if self.attention_kernel == "fused_cpu":
      require(kernels.supports(self.num_tokens, self.head_dim), "attention_kernel",
              self.attention_kernel,
              f"supports head dims {kernels.HEAD_DIMS} and at most "
              f"{kernels.MAX_TOKENS} tokens, not {self.head_dim} and {self.num_tokens} "
              "(attention_kernel='einsum' takes any shape)")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_window(self) -> int:
    """The side of one patch in pixels: its cell and the overlap on both sides."""
    return self.patch_size + 2 * self.patch_overlap

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_tokens(self) -> int:
    """The sequence the encoder attends over: the patches and the class token, if any."""
    return self.num_patches + (self.classifier == "token")


MODEL_CONFIGS: dict[str, ModelConfig] = {
    # A few thousand parameters: for unit tests and smoke runs.
    "testing": ModelConfig(patch_size=7, hidden_size=16, num_layers=1, num_heads=2,
                           mlp_dim=32),
    # The design's example: width 64 split into 4 heads of 16.
    "seed": ModelConfig(patch_size=4, hidden_size=64, num_layers=6, num_heads=4,
                        mlp_dim=128),
    # 7x7 patches (16 tokens, a third of the seed's 49), wider and shallower: the shape
    # of the time-to-accuracy recipes in experiments/mnist_fast.py and mnist_sprint.py.
    "fast": ModelConfig(patch_size=7, hidden_size=128, num_layers=4, num_heads=4,
                        mlp_dim=256),
    # The `fast` patches at the seed's width: about twice `fast`'s images/s, so more epochs
    # fit in a time budget (experiments/mnist_sprint.py).
    "sprint": ModelConfig(patch_size=7, hidden_size=64, num_layers=4, num_heads=4,
                          mlp_dim=128),
    # The seed's patches and depth at twice its width (heads of 32): the shape of the
    # long recipe in experiments/mnist_best.py, inside the 1.1M parameters it allows.
    "best": ModelConfig(patch_size=4, hidden_size=128, num_layers=6, num_heads=4,
                        mlp_dim=256),
    # Wider and deeper, for when the seed shape is not enough (e.g. Fashion-MNIST).
    "wide": ModelConfig(patch_size=4, hidden_size=192, num_layers=8, num_heads=6,
                        mlp_dim=384),
}


def get_model_config(name: str, **overrides: Any) -> ModelConfig:
  """The registered config `name`, with `overrides` applied and validated."""
  if name not in MODEL_CONFIGS:
    raise ValueError(f"model name={name!r} is not registered "
                     f"(known: {', '.join(sorted(MODEL_CONFIGS))})")
  fields = dataclasses.asdict(MODEL_CONFIGS[name])
  fields.update(overrides)
  return from_mapping(ModelConfig, fields, path="model")
