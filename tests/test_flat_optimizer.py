"""The optimizer on one flat vector: the same updates as on the model's arrays, few operations,
and checkpoints of the per-array layout read and brought up to date."""

import re
import shutil

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import small_config

from vit_jax import train_state
from vit_jax.checkpoints import CheckpointError, Checkpoints


def states(config=None):
  """(the run's state, the same parameters with the optimizer on each array)."""
  config = config or small_config(warmup_steps=0, weight_decay=0.1, grad_clip_norm=0.5)
  flat = train_state.create_train_state(config, total_steps=10)
  per_array = train_state.TrainState.create(apply_fn=flat.apply_fn, params=flat.params,
                                            tx=train_state.optimizer(config, total_steps=10))
  return flat, per_array


def trained(state, steps=3):
  """`steps` updates with random gradients (each array its own scale, some clipped)."""
  for step in range(steps):
    leaves, tree = jax.tree_util.tree_flatten(state.params)
    keys = jax.random.split(jax.random.PRNGKey(step), len(leaves))
    grads = [jax.random.normal(k, p.shape) * (i + 1) / 10
             for i, (k, p) in enumerate(zip(keys, leaves, strict=True))]
    state = state.apply_gradients(grads=jax.tree_util.tree_unflatten(tree, grads))
  return state


def assert_close(a, b):
  """The states' arrays (their optimizers, static, are different objects)."""
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-8),
                         (a.step, a.params, a.opt_state), (b.step, b.params, b.opt_state))


def stacked(first, *others):
  """Seeds' states on a leading axis, as `vit_jax.seeds` stacks them."""
  others = [other.replace(tx=first.tx, apply_fn=first.apply_fn) for other in others]
  return jax.tree_util.tree_map(lambda *a: jnp.stack(a), first, *others)


def test_the_flat_optimizer_updates_as_the_one_on_each_array():
  flat, per_array = map(trained, states())
  np.testing.assert_allclose(*(jax.flatten_util.ravel_pytree(s.params)[0]
                               for s in (flat, per_array)), rtol=2e-6, atol=1e-8)
  # Its moments are the per-array ones in the parameters' order: what the upgrade relies on.
  mu = [s for s in jax.tree_util.tree_leaves(flat.opt_state) if np.size(s) > 1]
  assert [np.shape(m) for m in mu] == [(sum(np.size(p) for p in
                                            jax.tree_util.tree_leaves(flat.params)),)] * 2
  _, upgrade = train_state.per_array_moments(flat)
  assert_close(upgrade(per_array), flat)


def test_seeds_stacked_are_upgraded_each_on_its_own():
  flat, per_array = states()
  flat_b, per_array_b = states(small_config(seed=1, warmup_steps=0, grad_clip_norm=0.5))
  flats = stacked(trained(flat), trained(flat_b, steps=2))
  earlier, upgrade = train_state.per_array_moments(flats)
  per_arrays = stacked(trained(per_array), trained(per_array_b, steps=2))
  assert (jax.tree_util.tree_structure(earlier.opt_state)
          == jax.tree_util.tree_structure(per_arrays.opt_state))
  assert_close(upgrade(per_arrays), flats)


def test_a_checkpoint_of_the_per_array_layout_resumes_with_its_moments(tmp_path):
  flat, per_array = map(trained, states())
  saved = Checkpoints(tmp_path, every_steps=1)
  saved.save(3, per_array, force=True)
  saved.close()
  fresh, _ = states()
  checkpoints = Checkpoints(tmp_path, read_only=True)
  restored = checkpoints.restore_latest(fresh, earlier=train_state.per_array_moments(fresh))
  assert_close(restored, flat)
  assert int(restored.step) == 3
  # Without the earlier layout it is another model's, refused and kept where it is.
  with pytest.raises(CheckpointError, match=r"holds another model: its array "
                                            r"\.opt_state\[1\]\[0\]\.mu is absent"):
    checkpoints.restore_latest(fresh)
  checkpoints.close()
  assert (tmp_path / "checkpoints" / "3").is_dir()
  # Saved before digests were recorded, its layout is not known: each is tried.
  shutil.rmtree(tmp_path / "checkpoint_digests")
  checkpoints = Checkpoints(tmp_path, every_steps=1)
  assert_close(checkpoints.restore_latest(fresh, earlier=train_state.per_array_moments(fresh)),
               flat)
  checkpoints.close()
  assert not (tmp_path / "checkpoints_unreadable").exists()


def operations(state) -> int:
  """The operations of the compiled update that do work (not parameters, bitcasts, tuples)."""
  grads = jax.tree_util.tree_map(jnp.ones_like, state.params)
  text = jax.jit(lambda s, g: s.apply_gradients(grads=g)).lower(state, grads).compile().as_text()
  entry = text[text.index("\nENTRY"):].splitlines()[1:]
  inert = r" (parameter|bitcast|get-tuple-element|tuple|constant)\("
  return sum(1 for line in entry
             if re.match(r"\s*(ROOT )?%\S+ = ", line) and not re.search(inert, line))


def test_the_update_takes_about_one_operation_per_array_not_several():
  flat, per_array = states()
  arrays = len(jax.tree_util.tree_leaves(flat.params))
  # Each array's new value is one fusion (its slice of the flat update, added); the flat
  # vector's clipping and moments a handful more. On each array, AdamW takes several apiece.
  assert operations(flat) < 2 * arrays < operations(per_array)
