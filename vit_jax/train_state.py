"""The training state: parameters, the optimizer with its schedule, and the moving average.

Layer 4 of vit_jax.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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


def optimizer(config: ExperimentConfig, total_steps: int) -> optax.GradientTransformation:
  """AdamW with the global norm of the gradient clipped, on arrays as it is handed them."""
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm),
      optax.adamw(learning_rate_schedule(config, total_steps),
                  weight_decay=config.weight_decay))


def create_train_state(config: ExperimentConfig, total_steps: int) -> TrainState:
  """Fresh parameters from `config.seed` and the `optimizer` run on them as one flat vector:
  its moments are flat vectors too (`ravel_pytree`'s order of the parameters)."""
  model = ViT(config.model)
  c = config.model
  dummy = jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(config.seed), dummy)["params"]
  # One vector: the update is a few operations, not several for each of the model's arrays
  # (on a CPU each costs microseconds to launch; docs/performance.md).
  tx = optax.flatten(optimizer(config, total_steps))
  if config.ema_decay:
    return EmaTrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                ema_params=params, ema_decay=config.ema_decay)
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def per_array_moments(state: TrainState) -> tuple[TrainState, Callable[[TrainState], TrainState]]:
  """`state` as checkpoints written before the optimizer ran on one flat vector hold it
  (before 2026-12-07: Adam's moments as trees shaped like the parameters, as `pretrained/mnist_seed`
  does), and the function that takes a state restored in that layout to `state`'s.

  `state` may be several seeds' stacked on a leading axis (`vit_jax.seeds`): each seed's
  moments are flattened on their own.
  """
  seeds = np.shape(state.step)  # () or (number of seeds,)
  size = sum(np.size(p) for p in jax.tree_util.tree_leaves(state.params)) // math.prod(seeds)

  def is_flat(leaf) -> bool:
    return np.shape(leaf) == (*seeds, size)

  def per_array(leaf):
    return jax.tree_util.tree_map(lambda p: jax.ShapeDtypeStruct(np.shape(p), leaf.dtype),
                                  state.params) if is_flat(leaf) else leaf

  def flattened(leaf, earlier):
    if not is_flat(leaf):
      return earlier
    arrays = jax.tree_util.tree_leaves(earlier)  # the parameters' order, as `ravel_pytree`'s
    return jnp.concatenate([jnp.reshape(a, (*seeds, -1)) for a in arrays], axis=-1)

  def upgrade(restored: TrainState) -> TrainState:
    return restored.replace(opt_state=jax.tree_util.tree_map(flattened, state.opt_state,
                                                             restored.opt_state))

  return state.replace(opt_state=jax.tree_util.tree_map(per_array, state.opt_state)), upgrade
