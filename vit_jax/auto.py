"""What a config leaves to the machine ('auto'), chosen once when a run starts.

`resolve` returns the config with `model.attention_kernel='auto'` replaced by the kernel
chosen here, so that config.json records it, and a line that says what runs and why. (The
config's other 'auto's, `parallel` and `idx_dir`, are resolved where they are used.)

Layer 4 of vit_jax.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from vit_jax import kernels
from vit_jax.experiment_config import ExperimentConfig
from vit_jax.model_configs import ModelConfig

# The kernel is taken only if its attention (forward and backward) runs at least this much
# faster than the einsum path's: below it, the readable path's clarity is worth more than a
# gain that the noise of a shared machine could have made.
MIN_KERNEL_SPEEDUP = 1.2


def choose_attention_kernel(model: ModelConfig, microbatch: int) -> tuple[str, str]:
  """-> ('einsum' or 'fused_cpu', why), for 'auto'; an explicit choice stands.

  `microbatch`: the examples a device takes at once (one micro-batch), the batch the
  kernel would see.
  """
  if model.attention_kernel != "auto":
    return model.attention_kernel, "as configured"
  if jax.default_backend() != "cpu":
    return "einsum", f"the fused kernel is for CPUs, this is a {jax.default_backend()}"
  if model.compute_dtype != "float32":
    return "einsum", f"the fused kernel computes in float32, not {model.compute_dtype}"
  if not kernels.supports(model.num_tokens, model.head_dim):
    return "einsum", (f"the fused kernel takes heads of {kernels.HEAD_DIMS} over at most "
                      f"{kernels.MAX_TOKENS} tokens, not {model.head_dim} over "
                      f"{model.num_tokens}")
  from vit_jax.kernels import fused_attention, timing

  if (why := fused_attention.load()) is not None:
    return "einsum", f"the fused kernel is unavailable: {why}"
  shape = (microbatch, model.num_heads, model.num_tokens, model.head_dim)
  speedup = timing.speedup_over_einsum(shape)
  if speedup >= MIN_KERNEL_SPEEDUP:
    return "fused_cpu", f"its attention measured {speedup:.2f}x einsum's here"
  return "einsum", (f"the fused kernel measured {speedup:.2f}x einsum's attention here, "
                    f"under {MIN_KERNEL_SPEEDUP}x")


def _same_in_every_process(choice: str, options: tuple[str, ...]) -> str:
  """Process 0's `choice`: every process must compile the same step."""
  if jax.process_count() == 1:
    return choice
  from jax.experimental import multihost_utils

  index = multihost_utils.broadcast_one_to_all(np.int32(options.index(choice)))
  return options[int(index)]


def resolve(config: ExperimentConfig, num_devices: int = 1, recorded: dict | None = None
            ) -> tuple[ExperimentConfig, str]:
  """-> (`config` with its 'auto' fields chosen, a one-line summary of what runs).

  `num_devices`: the devices that share each batch. `recorded`: the config.json of the
  workdir the run continues, if any: what it chose stands, so that a resumed run, or the
  evaluation of a finished one, computes as the run did.
  """
  per_device = config.batch_size // num_devices
  microbatch = min(per_device, config.microbatch_size or per_device)
  chosen_before = (recorded or {}).get("model", {}).get("attention_kernel")
  if config.model.attention_kernel == "auto" and chosen_before in kernels.KERNELS:
    kernel, why = chosen_before, "as this workdir's run chose: its config.json"
  else:
    kernel, why = choose_attention_kernel(config.model, microbatch)
  kernel = _same_in_every_process(kernel, kernels.KERNELS)
  model = dataclasses.replace(config.model, attention_kernel=kernel)
  config = dataclasses.replace(config, model=model)
  summary = (f"{num_devices} {jax.default_backend()} device{'s' * (num_devices > 1)}, "
             f"{model.compute_dtype} products, micro-batches of {microbatch} per device, "
             f"attention {kernel} ({why})")
  return config, summary
