"""The training state: parameters, the optimizer with its schedule, and the moving average.

Layer 4 of vit_jax.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from vit_jax.experiment_config import ExperimentConfig
from vit_jax.models import ViT

TrainState = train_state.TrainState


class EmaTrainState(TrainState):
  """A TrainState that also keeps an exponential moving average of the parameters, updated
  after every step (`ema_decay` per step) and used for evaluation (`evaluation_params`).

  Only runs with `config.ema_decay > 0` have one, so that a run without it saves and
  restores the same checkpoints as before the average existed.
  """
  ema_params: Any = None
  ema_decay: float = struct.field(pytree_node=False, default=0.0)


def evaluation_params(state: TrainState) -> Any:
  """The parameters a state is evaluated with: its moving average where it keeps one."""
  return state.ema_params if isinstance(state, EmaTrainState) else state.params


def update_average(state: TrainState) -> TrainState:
  """Each step t's parameters weighted decay^(step - t), normalised: the random start has
  none (a plain `decay * average + ...` keeps decay^step of it: 0.27 after 2,580 at 0.9995)."""
  if not isinstance(state, EmaTrainState):
    return state
  decay = state.ema_decay  # below: 1 - decay^step as -expm1, exact in float32 near step 1
  newest = (1 - decay) / -jnp.expm1(state.step.astype(jnp.float32) * math.log(decay))
  return state.replace(ema_params=jax.tree_util.tree_map(
      lambda average, new: (1 - newest) * average + newest * new,
      state.ema_params, state.params))


def learning_rate_schedule(config: ExperimentConfig, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0, then cosine decay to 0 at `total_steps` (`train.short_warmup_line`)."""
  warmup = min(config.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=0.0)


def create_train_state(config: ExperimentConfig, total_steps: int) -> TrainState:
  """Fresh parameters from `config.seed` and an AdamW optimizer with clipping."""
  model = ViT(config.model)
  c = config.model
  dummy = jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(config.seed), dummy)["params"]
  tx = optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm),
      optax.adamw(learning_rate_schedule(config, total_steps),
                  weight_decay=config.weight_decay))
  if config.ema_decay:
    return EmaTrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                ema_params=params, ema_decay=config.ema_decay)
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx)
