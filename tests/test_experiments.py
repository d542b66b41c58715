"""Sweeps' bookkeeping and the identity-projection ablation."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from vit_jax import analysis, models, sweep, train_state
from vit_jax import attention as A
from vit_jax.experiment_config import ExperimentConfig
from vit_jax.model_configs import get_model_config


def base_config(**model):
  return ExperimentConfig(model=get_model_config("testing", hidden_size=16, num_heads=2, **model),
                          train_examples=256, batch_size=64, num_epochs=0.25, warmup_steps=1,
                          eval_batch_size=200, parallel="jit", log_every_steps=1)


# --- The identity projection ------------------------------------------------------------

def test_identity_projection_attends_over_the_input_slices():
  x = np.random.default_rng(0).standard_normal((2, 5, 12)).astype(np.float32)
  layer = models.MultiHeadSelfAttention(num_heads=3, qkv="identity")
  params = layer.init(jax.random.PRNGKey(0), x)["params"]
  assert set(params) == {"to_out"}  # no W_Q, W_K, W_V to learn
  heads = A.split_heads(x, 3)
  out, _ = A.attend(heads, heads, heads)
  expected = A.merge_heads(out) @ params["to_out"]["kernel"] + params["to_out"]["bias"]
  np.testing.assert_allclose(layer.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-5)
  # Head h sees only slice h: changing slice 0 leaves head 1's attention unchanged.
  _, state = layer.apply({"params": params}, x, mutable=["intermediates"])
  x2 = x.copy()
  x2[..., :4] += 1.0
  _, state2 = layer.apply({"params": params}, x2, mutable=["intermediates"])
  w1, w2 = state["intermediates"]["attention_weights"][0], state2["intermediates"][
      "attention_weights"][0]
  np.testing.assert_allclose(w1[:, 1:], w2[:, 1:], rtol=1e-6)
  assert not np.allclose(w1[:, 0], w2[:, 0])


# --- Analysis ---------------------------------------------------------------------------

def test_attention_entropy_of_uniform_and_one_hot():
  uniform = np.full((2, 3, 5, 5), 0.2)
  assert analysis.attention_entropy(uniform) == pytest.approx(np.log(5))
  one_hot = np.broadcast_to(np.eye(5), (2, 3, 5, 5))
  assert analysis.attention_entropy(one_hot) == pytest.approx(0.0, abs=1e-9)


def test_attention_rollout_rows_sum_to_one_and_identity_maps_give_identity():
  rng = np.random.default_rng(0)
  maps = rng.random((3, 2, 4, 6, 6))
  maps /= maps.sum(-1, keepdims=True)
  rollout = analysis.attention_rollout(maps)
  assert rollout.shape == (2, 6, 6)
  np.testing.assert_allclose(rollout.sum(-1), 1.0)
  eye = np.broadcast_to(np.eye(6), (3, 2, 4, 6, 6))
  np.testing.assert_allclose(analysis.attention_rollout(eye), np.broadcast_to(np.eye(6),
                                                                              (2, 6, 6)))


def test_attention_rollout_averages_heads_adds_the_residual_and_multiplies_last_first():
  to_first = np.array([[1.0, 0.0], [1.0, 0.0]])  # every token attends to token 0
  to_second = np.array([[0.0, 1.0], [0.0, 1.0]])  # every token attends to token 1
  uniform = np.full((2, 2), 0.5)
  # Layer 1's heads differ (their mean counts); layer 2 has `to_second` in both.
  maps = np.array([[[to_first, uniform]], [[to_second, to_second]]])  # (L=2, B=1, H=2, 2, 2)
  layer_1 = (0.5 * (to_first + uniform) + np.eye(2)) / 2  # rows of A + I sum to 2
  layer_2 = (to_second + np.eye(2)) / 2
  expected = layer_2 @ layer_1  # the last layer's mixing applied to the first's
  np.testing.assert_allclose(analysis.attention_rollout(maps)[0], expected)
  assert not np.allclose(expected, layer_1 @ layer_2)  # the order is visible here


def test_query_attention_is_the_class_token_s_row_or_the_mean_over_queries():
  maps = np.ones((1, 1, 1, 5, 5))  # every query puts 1 on every key ...
  maps[..., 0, :] = [0.0, 0.1, 0.2, 0.3, 0.4]  # ... but the class token's own row
  np.testing.assert_allclose(analysis.query_attention(maps, "token")[0, 0, 0],
                             [0.1, 0.2, 0.3, 0.4])
  pooled = np.array([[1.0, 0, 0], [1, 0, 0], [0, 0, 1]])[None, None, None]  # rows: queries
  np.testing.assert_allclose(analysis.query_attention(pooled, "gap")[0, 0, 0],
                             [2 / 3, 0, 1 / 3])


def test_position_similarity_is_the_cosine_of_the_patches_embeddings():
  patches = [[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]]
  pos = np.array([[[9.0, -9.0]] + patches])  # (1, class token + 4 patches, 2)
  s = np.sqrt(0.5)
  np.testing.assert_allclose(analysis.position_similarity(pos, 4), [[1, 0, -1, s],
                                                                    [0, 1, 0, s],
                                                                    [-1, 0, 1, -s],
                                                                    [s, s, -s, 1]], atol=1e-12)


@pytest.mark.slow
def test_collect_attention_in_batches_equals_one_forward_pass():
  state = train_state.create_train_state(ExperimentConfig(model=get_model_config("testing")), 10)
  rng = np.random.default_rng(0)
  head = {"kernel": rng.normal(size=(16, 10)).astype(np.float32),  # not the zeros of init
          "bias": rng.normal(size=10).astype(np.float32)}
  state = state.replace(params={**state.params, "head": head})
  images = rng.integers(0, 256, (7, 28, 28, 1), dtype=np.uint8)
  logits, maps = analysis.collect_attention(state, images, "mnist", batch_size=3)
  x = (images / 255.0 - 0.1307) / 0.3081
  forward = jax.jit(lambda params, x: state.apply_fn({"params": params}, x,
                                                     mutable=["intermediates"]))
  expected, variables = forward(state.params, x.astype(np.float32))
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(maps, models.attention_maps(variables["intermediates"]),
                             rtol=1e-5, atol=1e-6)
  assert maps.shape == (1, 7, 2, 17, 17)


# --- Sweep bookkeeping -----------------------------------------------------------------

def test_plan_fixed_width_and_fixed_head_dim():
  base = base_config()
  runs = sweep.plan(base, heads=[1, 2, 4], seeds=[0, 1], qkv_modes=["fused", "identity"])
  assert len(runs) == 12
  assert {(r.heads, r.hidden_size) for r, _ in runs} == {(1, 16), (2, 16), (4, 16)}
  assert all(c.model.num_heads == r.heads and c.seed == r.seed and c.model.qkv == r.qkv
             for r, c in runs)
  runs = sweep.plan(base, heads=[1, 4], seeds=[0], fixed="head_dim")  # base head dim 8
  assert [(r.heads, r.hidden_size) for r, _ in runs] == [(1, 8), (4, 32)]
  with pytest.raises(ValueError, match="num_heads=3 does not divide hidden_size=16"):
    sweep.plan(base, heads=[3], seeds=[0])
  with pytest.raises(ValueError, match=r"^heads=\[4, 4\] repeats a value$"):
    sweep.plan(base, heads=[4, 4], seeds=[0])
  # The finer ablations, a low rank written with its rank; a rank above a head's size fails.
  runs = sweep.plan(base, heads=[2], seeds=[0], qkv_modes=["tied_qk", "low_rank:2"])
  assert [(c.model.qkv, c.model.qkv_rank, r.name) for r, c in runs] == [
      ("tied_qk", None, "tied_qk_h2_w16_s0"), ("low_rank", 2, "low_rank2_h2_w16_s0")]
  with pytest.raises(ValueError, match="qkv_rank=8 must be an integer from 1 to head_dim=4"):
    sweep.plan(base, heads=[4], seeds=[0], qkv_modes=["low_rank:8"])


def fake_record(run, accuracy, config):
  return {**run.__dict__, "name": run.name, "params": 100 * run.heads, "eval_accuracy": accuracy,
          "eval_loss": 0.1, "images_per_sec": 1000.0, "wall_seconds": 10.0, "resumed": False,
          "attention_entropy": 1.5, "config": sweep._as_json(config)}


def test_run_all_skips_finished_and_resumes_unfinished(tmp_path, monkeypatch):
  runs = sweep.plan(base_config(), heads=[1, 2], seeds=[0])
  finished, unfinished = runs
  (tmp_path / finished[0].name).mkdir()
  (tmp_path / finished[0].name / "result.json").write_text(
      json.dumps(fake_record(finished[0], 0.9, finished[1])))
  (tmp_path / unfinished[0].name / "checkpoints").mkdir(parents=True)
  trained = []

  def fake_run_one(run, config, workdir, data):
    trained.append((run.name, (workdir / "checkpoints").is_dir()))
    return fake_record(run, 0.8, config)

  monkeypatch.setattr(sweep, "run_one", fake_run_one)
  said = []
  records = sweep.run_all(runs, tmp_path, data={}, say=said.append)
  assert trained == [(unfinished[0].name, True)]
  assert [r["eval_accuracy"] for r in records] == [0.9, 0.8]
  assert said[0].endswith(f"{finished[0].name}: finished before, skipped")  # a group of one
  assert "resuming" in said[1]
  # A run finished before newer config fields existed is still the same run.
  older = json.loads((tmp_path / finished[0].name / "result.json").read_text())
  del older["config"]["validation_examples"], older["config"]["model"]["drop_path_rate"]
  (tmp_path / finished[0].name / "result.json").write_text(json.dumps(older))
  assert len(sweep.run_all(runs[:1], tmp_path, data={}, say=said.append)) == 1
  assert trained == [(unfinished[0].name, True)]  # skipped, not trained again
  # A finished run of another config is not silently reused.
  other = sweep.plan(dataclasses.replace(base_config(), num_epochs=0.5), heads=[1], seeds=[0])
  with pytest.raises(ValueError, match="finished with a different num_epochs"):
    sweep.run_all(other, tmp_path, data={}, say=said.append)
  # Where the data lies, how evaluation is batched and how often it logs change no result.
  elsewhere = dataclasses.replace(base_config(), tfds_data_dir="/elsewhere", eval_batch_size=7,
                                  keep_checkpoints=1, log_every_steps=3)
  assert len(sweep.run_all(sweep.plan(elsewhere, heads=[1], seeds=[0]), tmp_path, data={},
                           say=said.append)) == 1


def test_a_seed_with_checkpoints_of_its_own_resumes_alone_not_in_a_new_group(tmp_path,
                                                                            monkeypatch):
  runs = sweep.plan(base_config(), heads=[1], seeds=[0, 1, 2])
  # Seed 1 holds its group's final state; its record was never written (killed just before).
  (tmp_path / runs[1][0].name / "checkpoints").mkdir(parents=True)
  calls = []
  monkeypatch.setattr(sweep, "run_one", lambda r, c, w, d: calls.append([r.seed]) or
                      fake_record(r, 0.8, c))
  monkeypatch.setattr(sweep, "run_seeds", lambda group, root, d: calls.append(
      [r.seed for r, _ in group]) or [fake_record(r, 0.8, c) for r, c in group])
  said = []
  records = sweep.run_all(runs, tmp_path, data={}, say=said.append, vmap_seeds=True)
  assert calls == [[1], [0, 2]] and [r["seed"] for r in records] == [0, 1, 2]
  assert said[0].endswith("resuming") and said[2].endswith("training 2 seeds as one")


def test_a_run_started_with_another_config_is_not_resumed_under_this_one(tmp_path, monkeypatch):
  from vit_jax import workdir as workdir_files

  runs = sweep.plan(base_config(), heads=[1], seeds=[0])
  [(run, config)] = runs
  workdir = tmp_path / run.name
  (workdir / "checkpoints").mkdir(parents=True)
  # What a run leaves: its config with the 'auto' choices made on its machine.
  resolved = dataclasses.replace(config, microbatch_size=8, model=dataclasses.replace(
      config.model, attention_kernel="einsum", compute_dtype="float32"))
  workdir_files.write_or_check_config(workdir, dataclasses.replace(resolved, learning_rate=0.5))
  trained = []
  monkeypatch.setattr(sweep, "run_one", lambda r, c, w, d: trained.append(r) or
                      fake_record(r, 0.8, c))
  with pytest.raises(ValueError, match=f"{run.name} was started with a different "
                                       "learning_rate; use another --root"):
    sweep.run_all(runs, tmp_path, data={}, say=lambda _: None)
  assert not trained
  # An explicit precision is part of what the sweep asked for.
  bfloat16 = sweep.plan(dataclasses.replace(base_config(), model=dataclasses.replace(
      config.model, compute_dtype="bfloat16")), heads=[1], seeds=[0])
  workdir_files.write_or_check_config(workdir, resolved)  # the same run, resolved elsewhere
  with pytest.raises(ValueError, match="was started with a different model.compute_dtype"):
    sweep.run_all(bfloat16, tmp_path, data={}, say=lambda _: None)
  assert len(sweep.run_all(runs, tmp_path, data={}, say=lambda _: None)) == 1
  assert trained == [run]


def test_a_run_another_process_holds_is_skipped_and_reports_wait(tmp_path, monkeypatch):
  from vit_jax.locks import WorkdirLock

  runs = sweep.plan(base_config(), heads=[1, 2], seeds=[0])
  trained = []
  def fake_run_one(run, config, workdir, data):  # as run_one: trains, then writes its result
    trained.append(run.name)
    (workdir / "result.json").write_text(json.dumps(fake_record(run, 0.8, config)))
    return fake_record(run, 0.8, config)

  monkeypatch.setattr(sweep, "run_one", fake_run_one)
  said = []
  (tmp_path / runs[0][0].name).mkdir()
  with WorkdirLock(tmp_path / runs[0][0].name, "sweep_lock"):  # as another process would
    records = sweep.run_all(runs, tmp_path, data={}, say=said.append)
  assert trained == [runs[1][0].name] and len(records) == 1
  assert "taken by another process, skipped" in said[0]
  # Collecting only (--report_only) trains nothing and returns what is finished.
  assert len(sweep.run_all(runs, tmp_path, data=None, say=said.append)) == 1
  assert trained == [runs[1][0].name]


def test_after_run_sees_every_finished_run_under_its_lock_but_not_one_held_elsewhere(
    tmp_path, monkeypatch):
  from vit_jax.locks import WorkdirBusyError, WorkdirLock

  runs = sweep.plan(base_config(), heads=[1, 2, 4], seeds=[0])
  (tmp_path / runs[0][0].name).mkdir()  # finished before this sweep
  (tmp_path / runs[0][0].name / "result.json").write_text(
      json.dumps(fake_record(runs[0][0], 0.9, runs[0][1])))

  def fake_run_one(run, config, workdir, data):
    return fake_record(run, 0.8, config)

  monkeypatch.setattr(sweep, "run_one", fake_run_one)
  seen = []

  def after_run(config, workdir):
    with pytest.raises(WorkdirBusyError):  # the sweep holds the run while it is analyzed
      WorkdirLock(workdir, "sweep_lock").__enter__()
    seen.append((workdir.name, config.model.num_heads))

  said = []
  (tmp_path / runs[2][0].name).mkdir()
  with WorkdirLock(tmp_path / runs[2][0].name, "sweep_lock"):  # another process trains it
    sweep.run_all(runs, tmp_path, data={}, say=said.append, after_run=after_run)
  assert seen == [(runs[0][0].name, 1), (runs[1][0].name, 2)]
  sweep.run_all(runs, tmp_path, data=None, say=said.append, after_run=after_run)
  assert len(seen) == 2  # collecting only (--report_only) analyzes nothing
  # A finished run another process holds (analyzing it) is left to that process.
  with WorkdirLock(tmp_path / runs[0][0].name, "sweep_lock"):
    sweep.run_all(runs[:1], tmp_path, data={}, say=said.append, after_run=after_run)
  assert len(seen) == 2 and "held by another process: not analyzed here" in said[-1]


@pytest.mark.slow
def test_vmapped_seeds_leave_each_run_as_a_separate_run_would(tmp_path, digits):
  data = {"train": {k: v[:256] for k, v in digits["train"].items()},
          "test": {k: v[:200] for k, v in digits["test"].items()}}
  runs = sweep.plan(base_config(), heads=[2], seeds=[0, 1, 2])
  alone = sweep.run_all(runs[1:2], tmp_path / "alone", data, say=lambda _: None)
  said = []
  records = sweep.run_all(runs[1:], tmp_path, data, say=said.append, vmap_seeds=True)
  assert "training 2 seeds as one" in said[0] and (tmp_path / "fused_h2_w16_s1-2").is_dir()
  assert [r["seed"] for r in records] == [1, 2]
  assert all((tmp_path / r["name"] / "result.json").is_file() for r in records)
  # Seed 1 trained with seed 2 ends where seed 1 trained alone does.
  assert records[0]["eval_loss"] == pytest.approx(alone[0]["eval_loss"], rel=1e-4)
  assert records[0]["eval_loss"] != pytest.approx(records[1]["eval_loss"], rel=1e-4)
  # Seed 0 joins them: the finished seeds are skipped, the one left trains on its own.
  said.clear()
  records = sweep.run_all(runs, tmp_path, data, say=said.append, vmap_seeds=True)
  assert "2 of 3 finished before" in said[0] and said[1].endswith("training")
  assert [r["seed"] for r in records] == [0, 1, 2]
