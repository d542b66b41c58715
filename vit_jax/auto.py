"""What a config leaves to the machine ('auto'), chosen once when a run starts.

`resolve` returns the config with its 'auto's replaced by what is chosen here, so that
config.json records it, and a line that says what runs and why:

- `model.compute_dtype`: bfloat16 where the hardware multiplies it (GPUs, TPUs, CPUs with
  AVX-512 BF16 or AMX), else float32;
- `microbatch_size`: cache-sized micro-batches on a CPU, the whole share on a GPU or TPU;
- `model.attention_kernel`: the fused CPU kernel where it builds and measures faster.

(The config's other 'auto's, `parallel` and `idx_dir`, are resolved where they are used;
the CPU's device count before JAX starts, by `host_cpu`.)

Layer 4 of vit_jax.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import host_cpu, input_pipeline, kernels
from vit_jax.experiment_config import ExperimentConfig
from vit_jax.model_configs import FUSED_QKV_MODES, ModelConfig

# On a CPU, a micro-batch holds about this many floats of one layer's activations (examples
# x tokens x width), 200 KB: the size that measured fastest for the three shapes timed
# (docs/performance.md, "Micro-batches": 16 examples of `seed` and of `fast`, 32 of
# `sprint`). Larger ones spill out of the caches; smaller ones leave the products thin.
CPU_MICROBATCH_FLOATS = 16 * 50 * 64

# The kernel is taken only if its attention (forward and backward) runs at least this much
# faster than the einsum path's: below it, the two are within a shared machine's noise. Not
# higher: the `best` ViT's heads of 32 measure 1.15x here, and its training step 1.10x
# (docs/performance.md, "Which attention a run takes"), a gain a stricter line (1.2x) lost.
MIN_KERNEL_SPEEDUP = 1.05


def choose_attention_kernel(model: ModelConfig, microbatch: int) -> tuple[str, str]:
  """-> ('einsum' or 'fused_cpu', why), for 'auto'; an explicit choice stands.

  `microbatch`: the examples a device takes at once (one micro-batch), the batch the
  kernel would see. `model.compute_dtype` is already chosen (`resolve` chooses it first):
  the einsum path is timed in it, both paths with Q, K and V as `model.qkv` makes them (one
  fused projection that the kernel reads in place, or apart, which it concatenates).
  """
  if model.attention_kernel == "fused_cpu":
    _check_the_kernel_runs()
  if model.attention_kernel != "auto":
    return model.attention_kernel, "as configured"
  if jax.default_backend() != "cpu":
    return "einsum", f"the fused kernel is for CPUs, this is a {jax.default_backend()}"
  if not kernels.supports(model.num_tokens, model.head_dim):
    return "einsum", (f"the fused kernel takes heads of {kernels.HEAD_DIMS} over at most "
                      f"{kernels.MAX_TOKENS} tokens, not {model.head_dim} over "
                      f"{model.num_tokens}")
  from vit_jax.kernels import fused_attention, timing

  if (why := fused_attention.load()) is not None:
    return "einsum", f"the fused kernel is unavailable: {why}"
  shape = (microbatch, model.num_heads, model.num_tokens, model.head_dim)
  speedup = timing.speedup_over_einsum(shape, model.compute_dtype,
                                       model.qkv in FUSED_QKV_MODES)
  if speedup >= MIN_KERNEL_SPEEDUP:
    return "fused_cpu", f"its attention measured {speedup:.2f}x einsum's here"
  return "einsum", (f"the fused kernel measured {speedup:.2f}x einsum's attention here, "
                    f"under {MIN_KERNEL_SPEEDUP}x")


def _check_the_kernel_runs() -> None:
  """A one-line ValueError where an explicit 'fused_cpu' cannot run (the model would
  otherwise take the einsum path without a word)."""
  if (why := _kernel_failure()) is not None:
    raise ValueError(f"model.attention_kernel='fused_cpu' {why} (use 'auto' or 'einsum')")


def _kernel_failure() -> str | None:
  """Why the fused kernel cannot run here, or None where it can."""
  from vit_jax.kernels import fused_attention

  backend = jax.default_backend()
  if backend != "cpu":
    return f"runs on CPUs only, this is a {backend}"
  if (failure := fused_attention.load()) is not None:
    return f"cannot run here: {failure}"
  return None


def _recorded_kernel_here(kernel: str, why: str) -> tuple[str, str]:
  """A recorded 'fused_cpu' where it cannot run: einsum, which computes the same, said so."""
  if kernel == "fused_cpu" and (failure := _kernel_failure()) is not None:
    return "einsum", f"this workdir's run chose fused_cpu, which {failure}; the same maths"
  return kernel, why


def _recorded_dtype_here(dtype: str, why: str) -> tuple[str, str]:
  """A recorded bfloat16 where XLA cannot compute it: one line, not XLA's traceback later."""
  if dtype == "bfloat16" and (failure := bfloat16_failure()) is not None:
    raise ValueError(f"this workdir's run computed in bfloat16, which cannot run on this "
                     f"{jax.default_backend()}: {failure} (pass "
                     "--config.model.compute_dtype=float32 to go on in float32)")
  return dtype, why


def bfloat16_failure() -> str | None:
  """Why this platform cannot compute a bfloat16 product, or None where it can."""
  try:
    x = jnp.ones((8, 8), jnp.bfloat16)
    jax.jit(lambda a: jnp.einsum("ij,jk->ik", a, a, preferred_element_type=jnp.float32)
            )(x).block_until_ready()
  except Exception as error:  # noqa: BLE001 (whatever XLA raises: the dtype cannot run here)
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return None


def choose_compute_dtype(model: ModelConfig) -> tuple[str, str]:
  """-> ('float32' or 'bfloat16', why), for 'auto'; an explicit choice stands.

  Raises a one-line ValueError for bfloat16 where XLA cannot compute it on this platform.
  """
  backend = jax.default_backend()
  if model.compute_dtype == "bfloat16" and (why := bfloat16_failure()) is not None:
    raise ValueError(f"model.compute_dtype='bfloat16' cannot run on this {backend}: {why} "
                     "(use 'float32' or 'auto')")
  units = backend != "cpu" or host_cpu.has_bfloat16_units()
  if model.compute_dtype != "auto":
    emulated = model.compute_dtype == "bfloat16" and not units
    return model.compute_dtype, ("as configured, though this CPU has no bfloat16 units: XLA "
                                 "emulates them, slower than float32" if emulated
                                 else "as configured")
  if backend != "cpu":
    return "bfloat16", f"a {backend} multiplies bfloat16 at full rate"
  if units:
    return "bfloat16", "this CPU multiplies bfloat16 (AVX-512 BF16 or AMX)"
  return "float32", "this CPU has no bfloat16 units (AVX-512 BF16 or AMX)"


def choose_microbatch_size(config: ExperimentConfig, per_device: int
                           ) -> tuple[int | None, str]:
  """-> (examples per micro-batch, or None for the whole share, why), for 'auto'.

  `per_device`: a device's share of the batch. On a CPU: `input_pipeline.cache_sized_part` of the
  share, with what holds `CPU_MICROBATCH_FLOATS` of a layer's activations as what fits.
  """
  if config.microbatch_size != "auto":
    return config.microbatch_size, "as configured"
  if jax.default_backend() != "cpu":
    return None, f"the whole share on a {jax.default_backend()}"
  c = config.model
  fits = max(1, CPU_MICROBATCH_FLOATS // (c.num_tokens * c.hidden_size))
  if fits >= per_device:
    return None, "the whole share fits the CPU's caches"
  size = input_pipeline.cache_sized_part(per_device, fits)
  if size == per_device:
    return None, (f"the whole share: {per_device} examples have no divisor from {fits // 4} "
                  f"to {fits}, what fits the CPU's caches")
  return size, f"{size} of {c.num_tokens} tokens x {c.hidden_size} fit the CPU's caches"


def eval_images_per_pass(model: ModelConfig) -> int:
  """Images per forward pass of evaluation: on a CPU, twice what a training micro-batch
  holds (a pass keeps no activations for a backward pass; 25-32 images of `seed` measured
  1.3x one pass over a device's share of 500-512 and 1.07x passes of 16, docs/performance.md,
  "Evaluation in cache-sized passes"); on a GPU or TPU 0, the whole share at once."""
  if jax.default_backend() != "cpu":
    return 0
  return max(1, 2 * CPU_MICROBATCH_FLOATS // (model.num_tokens * model.hidden_size))


def _same_in_every_process(choice: str, options: tuple[str, ...]) -> str:
  """Process 0's `choice`: every process must compile the same step."""
  if jax.process_count() == 1:
    return choice
  from jax.experimental import multihost_utils

  index = multihost_utils.broadcast_one_to_all(np.int32(options.index(choice)))
  return options[int(index)]


def _as_recorded(model: ModelConfig, field: str, before: dict, options: tuple[str, ...],
                 choose, here) -> tuple[str, str]:
  """(model.`field` where 'auto' is resolved, why): what the workdir's run recorded in
  `before` (its config.json's model) if it is one of `options`, passed through `here`
  (choice, why) -> (choice, why) for what this machine can run, else `choose()`; process 0's
  choice in every process."""
  if getattr(model, field) == "auto" and before.get(field) in options:
    choice, why = here(before[field], "as this workdir's run chose")
  else:
    choice, why = choose()
  return _same_in_every_process(choice, options), why


def _recorded_microbatch_size(config: ExperimentConfig, per_device: int, recorded: dict | None
                              ) -> tuple[int | None, str] | None:
  """For 'auto', the micro-batch size the workdir's run took (None: whole shares), if it
  recorded one that still divides a device's share (`per_device`): the micro-batches' count
  also sets each one's dropout draws, so another size would continue the run with other
  draws. None where it must be chosen again (another device count or batch)."""
  if config.microbatch_size != "auto" or not recorded:
    return None
  size = recorded.get("microbatch_size", "auto")
  if size is None or (isinstance(size, int) and size > 0 and (
      per_device <= size or per_device % size == 0)):
    return size, ("as" if size else "the whole share, as") + " this workdir's run chose"
  return None


def resolve(config: ExperimentConfig, num_devices: int = 1, recorded: dict | None = None
            ) -> tuple[ExperimentConfig, str]:
  """-> (`config` with its 'auto' fields chosen, a one-line summary of what runs).

  `num_devices`: the devices that share each batch. `recorded`: the config.json of the
  workdir the run continues, if any: the precision, attention and micro-batch size it chose
  stand, so that a resumed run, or the evaluation of a finished one, computes as the run did.
  """
  per_device = config.batch_size // num_devices
  before = (recorded or {}).get("model", {})
  dtype, dtype_why = _as_recorded(config.model, "compute_dtype", before, ("float32", "bfloat16"),
                                  lambda: choose_compute_dtype(config.model),
                                  _recorded_dtype_here)
  size, size_why = (_recorded_microbatch_size(config, per_device, recorded)
                    or choose_microbatch_size(config, per_device))
  config = dataclasses.replace(config, microbatch_size=size,
                               model=dataclasses.replace(config.model, compute_dtype=dtype))
  microbatch = min(per_device, size or per_device)
  kernel, why = _as_recorded(config.model, "attention_kernel", before, kernels.KERNELS,
                             lambda: choose_attention_kernel(config.model, microbatch),
                             _recorded_kernel_here)
  config = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                 attention_kernel=kernel))
  summary = (f"{num_devices} {jax.default_backend()} device{'s' * (num_devices > 1)}, "
             f"{dtype} products ({dtype_why}), micro-batches of {microbatch} per device "
             f"({size_why}), attention {kernel} ({why})")
  return config, summary
