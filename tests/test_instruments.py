"""The head instruments, each against a computation of its own."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import attention, input_pipeline, instruments, models
from vit_jax.model_configs import get_model_config

MODEL = get_model_config("testing", num_layers=2)  # width 16, 2 heads of 8, 16 patches


@pytest.fixture(scope="module")
def params():
  images = jnp.zeros((1, 28, 28, 1))
  params = jax.jit(models.ViT(MODEL).init)(jax.random.PRNGKey(0), images)["params"]
  # A head that is not zero-initialised, so that every logit depends on the blocks.
  return {**params, "head": {"kernel": jax.random.normal(jax.random.PRNGKey(1), (16, 10)),
                             "bias": jnp.zeros(10)}}


def without_out_rows(params, layer, rows):
  """`params` with rows of a layer's W_O zeroed: those heads' outputs reach nothing."""
  kernel = params["encoder"][f"block{layer}"]["attention"]["to_out"]["kernel"]
  new = jax.tree_util.tree_map(lambda x: x, params)
  new["encoder"][f"block{layer}"]["attention"]["to_out"]["kernel"] = kernel.at[rows].set(0.0)
  return new


def test_removing_every_head_of_a_layer_equals_a_zero_attention_output(params):
  images = jax.random.uniform(jax.random.PRNGKey(2), (3, 28, 28, 1))
  apply = jax.jit(lambda p, m: models.ViT(MODEL).apply({"params": p}, images, head_mask=m))
  mask = jnp.ones((2, 2)).at[1].set(0.0)
  removed = apply(params, mask)
  zero_out = apply(without_out_rows(params, 1, slice(None)), jnp.ones((2, 2)))
  np.testing.assert_allclose(removed, zero_out, rtol=1e-5, atol=1e-6)
  intact = jax.jit(models.ViT(MODEL).apply)({"params": params}, images)
  np.testing.assert_allclose(apply(params, jnp.ones((2, 2))), intact, rtol=1e-6, atol=1e-7)
  assert not np.allclose(removed, intact)


def test_remove_heads_keeps_kept_heads_and_puts_zeros_or_the_means_in_removed_ones():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 4))
  means = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 4))
  mask = jnp.array([1.0, 0.0, 1.0])
  zeroed, replaced = attention.remove_heads(x, mask), attention.remove_heads(x, mask, means)
  for out in (zeroed, replaced):
    np.testing.assert_array_equal(out[:, [0, 2]], x[:, [0, 2]])
  np.testing.assert_array_equal(zeroed[:, 1], 0.0)
  np.testing.assert_array_equal(replaced[:, 1], jnp.broadcast_to(means[1], (2, 5, 4)))
  with pytest.raises(AssertionError):  # merged heads (B, N, D) with N = H would broadcast
    attention.remove_heads(jnp.ones((3, 3, 8)), mask)
  with pytest.raises(ValueError, match="head_means applies to the heads a head_mask removes"):
    attention.self_attention(x[:, 0], {"to_out": {"kernel": jnp.eye(4), "bias": jnp.zeros(4)}},
                             2, head_means=means[:2])


def test_mean_ablation_with_one_images_own_means_changes_nothing(params):
  # Over one image a head's mean output is its output: replacing every head by it must give
  # the intact logits, which holds only if `head_means` computes the heads as the model does.
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (2, 28, 28, 1)).astype(np.uint8)
  apply_fn = models.ViT(MODEL).apply
  means = [instruments.head_means(apply_fn, params, MODEL, images[i:i + 1], "mnist")
           for i in range(2)]
  assert means[0].shape == (2, 2, 17, 8)
  both = instruments.head_means(apply_fn, params, MODEL, images, "mnist", batch_size=1)
  np.testing.assert_allclose(both, (means[0] + means[1]) / 2, rtol=1e-5, atol=1e-6)
  none = jnp.zeros((2, 2))
  normalized = input_pipeline.normalize(images, "mnist")
  for i in range(2):
    intact = apply_fn({"params": params}, normalized[i:i + 1])
    own = apply_fn({"params": params}, normalized[i:i + 1], head_mask=none, head_means=means[i])
    other = apply_fn({"params": params}, normalized[i:i + 1], head_mask=none,
                     head_means=means[1 - i])
    np.testing.assert_allclose(own, intact, rtol=1e-4, atol=1e-5)
    assert not np.allclose(other, intact, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_head_importance_and_pruning_match_models_without_those_heads(params):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (40, 28, 28, 1)).astype(np.uint8)
  labels = rng.integers(0, 10, 40).astype(np.int32)
  apply_fn = models.ViT(MODEL).apply
  evaluate = instruments.masked_evaluator(apply_fn, params, "mnist", batch_size=16)
  importance = instruments.head_importance(evaluate, MODEL, images, labels)
  ones = jnp.ones((2, 2))
  for layer in range(2):
    for head in range(2):
      pruned = without_out_rows(params, layer, slice(8 * head, 8 * head + 8))
      loss, accuracy = instruments.masked_evaluator(apply_fn, pruned, "mnist")(images, labels,
                                                                               ones)
      assert importance["loss"][layer, head] == pytest.approx(loss, rel=1e-5)
      assert importance["accuracy"][layer, head] == accuracy
  curve = instruments.pruning_curve(evaluate, importance, images, labels)
  assert [c[0] for c in curve] == [0, 1, 2, 3, 4]
  assert curve[1][1] == np.unravel_index(np.argmin(importance["loss"]), (2, 2))
  none_left = without_out_rows(without_out_rows(params, 0, slice(None)), 1, slice(None))
  loss, _ = instruments.masked_evaluator(apply_fn, none_left, "mnist")(images, labels, ones)
  assert curve[-1][2] == pytest.approx(loss, rel=1e-5)


def test_spectra_of_known_projections():
  width, dh = 16, 8
  values = np.arange(1.0, width + 1)
  attention = {"to_qkv": {"kernel": np.concatenate([2 * np.eye(width), np.eye(width),
                                                    np.diag(values)], axis=1)},
               "to_out": {"kernel": np.eye(width)}}
  params = {"encoder": {f"block{i}": {"attention": attention} for i in range(2)}}
  records = {(r["layer"], r["head"], r["matrix"]): r
             for r in instruments.projection_spectra(params, MODEL)}
  assert len(records) == 2 * 2 * 5
  np.testing.assert_allclose(records[0, 1, "W_QK"]["singular_values"], [2.0] * dh)
  assert records[0, 1, "W_QK"]["effective_rank"] == pytest.approx(dh)
  head1 = values[dh:][::-1]  # W_V W_O of head 1: its diagonal block, largest first
  np.testing.assert_allclose(records[1, 1, "W_VO"]["singular_values"], head1)
  p = head1 / head1.sum()
  assert records[1, 1, "W_VO"]["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
  assert instruments.effective_rank(np.array([5.0, 0.0, 0.0])) == pytest.approx(1.0)


def test_the_mean_distance_of_one_hot_maps_by_hand():
  maps = np.zeros((1, 1, 1, 5, 5))  # a class token and a 2x2 grid of 4-pixel patches
  maps[..., :, 4] = 1.0  # every query looks at the bottom-right patch only
  expected = (math.sqrt(32) + 4 + 4 + 0) / 4  # from (0,0), (0,4), (4,0) and (4,4)
  assert instruments.attention_distance(maps, grid=2, patch_size=4)[0, 0] == pytest.approx(
      expected)


def test_redundancy_is_zero_for_equal_heads_and_log2_for_disjoint_ones():
  maps = np.zeros((1, 1, 3, 2, 2))
  maps[0, 0, 0, :, 0] = maps[0, 0, 1, :, 0] = 1.0  # heads 0 and 1 alike
  maps[0, 0, 2, :, 1] = 1.0  # head 2 elsewhere
  divergence = instruments.head_redundancy(maps)[0]
  assert divergence.shape == (3, 3)
  assert divergence[0, 1] == pytest.approx(0.0)
  assert divergence[0, 2] == pytest.approx(math.log(2)) == divergence[2, 1]


def test_redundancy_a_few_images_at_a_time_equals_all_at_once():
  rng = np.random.default_rng(0)
  maps = rng.dirichlet(np.ones(6), size=(2, 11, 3, 6))  # (L, B, H, N, N), rows summing to 1
  p, q = maps[:, :, :, None], maps[:, :, None]
  m = (p + q) / 2
  whole = (0.5 * (p * np.log(p / m)).sum(-1) + 0.5 * (q * np.log(q / m)).sum(-1)).mean((1, 4))
  for at_once in (1, 4, 11, 64):
    np.testing.assert_allclose(instruments.head_redundancy(maps, at_once), whole, rtol=1e-12)


@pytest.mark.slow
def test_training_logs_attention_statistics_and_effective_ranks_and_draws_them(tmp_path,
                                                                               digits):
  import json

  from vit_jax import analysis, inference, train, visualize
  from vit_jax.experiment_config import ExperimentConfig

  config = ExperimentConfig(model=MODEL, batch_size=64, num_epochs=1, eval_every_steps=8,
                            checkpoint_every_steps=8, eval_batch_size=256, parallel="jit",
                            validation_examples=59_000, augment_max_shift=0)
  data = {"train": {k: v[:1024] for k, v in digits["train"].items()}, "test": digits["test"],
          "validation": {k: v[1024:] for k, v in digits["train"].items()}}
  train.train_and_evaluate(config, tmp_path, data=data)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  evaluations = [r for r in records if "attention_entropy/layer1/head1" in r]
  assert [r["step"] for r in evaluations] == [8, 16]
  ranks = [r for r in records if "effective_rank/W_QK/layer0/head0" in r]
  assert [r["step"] for r in ranks] == [8, 16]
  # The last ones are the final model's: its checkpoint's, on the first 256 held-out images.
  final = inference.restore_state(config, tmp_path).params
  assert {k: v for k, v in ranks[-1].items() if k.startswith("effective_rank/")} == \
      pytest.approx(instruments.effective_ranks(final, MODEL), rel=1e-6)
  _, maps = analysis.forward_with_attention(models.ViT(MODEL).apply, "mnist")(
      final, data["validation"]["image"][:256])
  p = np.asarray(maps, np.float64)[1, :, 0]  # layer 1, head 0: (B, N, N)
  # Near log 17 this early, where other images move it by 1e-5: only a tight match tells.
  assert evaluations[-1]["attention_entropy/layer1/head0"] == pytest.approx(
      -(p * np.log(p)).sum(-1).mean(), rel=1e-9)
  drawn = visualize.plot_training_statistics(tmp_path / "metrics.jsonl", tmp_path / "t.png")
  assert drawn == tmp_path / "t.png" and drawn.stat().st_size > 0


def test_analyze_writes_each_heads_own_statistics_in_its_row(tmp_path):
  import csv

  from scipy.spatial.distance import jensenshannon
  from scipy.stats import entropy

  from vit_jax import analyze

  logits = np.random.default_rng(0).normal(size=(2, 3, 2, 17, 17)) * 3  # (L, B, H, N, N)
  maps = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  analyze._attention_statistics(tmp_path, maps, MODEL)
  with open(tmp_path / "attention_statistics.csv") as f:
    rows = {(int(r["layer"]), int(r["head"])): r for r in csv.DictReader(f)}
  with open(tmp_path / "head_redundancy.csv") as f:
    js = {(int(r["layer"]), int(r["head_a"]), int(r["head_b"])): float(r["js_divergence"])
          for r in csv.DictReader(f)}
  distance = instruments.attention_distance(maps, 4, 7)
  for layer, head in np.ndindex(2, 2):  # scipy's, row by row
    want = np.mean([entropy(row) for row in maps[layer, :, head].reshape(-1, 17)])
    assert float(rows[layer, head]["entropy"]) == pytest.approx(want, rel=1e-9)
    assert float(rows[layer, head]["mean_distance_pixels"]) == pytest.approx(distance[layer, head])
  for layer in range(2):
    pairs = zip(maps[layer, :, 0].reshape(-1, 17), maps[layer, :, 1].reshape(-1, 17), strict=True)
    want = np.mean([jensenshannon(p, q) ** 2 for p, q in pairs])
    assert js[layer, 0, 1] == js[layer, 1, 0] == pytest.approx(want, rel=1e-6)
    assert js[layer, 0, 0] == 0
