"""The benchmark runs (so it cannot rot) and its FLOP count agrees with XLA's. No speed asserts."""

import dataclasses
import time

import jax
import numpy as np
import pytest

from vit_jax import benchmark
from vit_jax.benchmark import ceiling
from vit_jax.experiment_config import ExperimentConfig
from vit_jax.model_configs import get_model_config

FLOP_TOLERANCE = 0.10  # XLA also counts softmax, LayerNorm, GELU, the optimizer update


def test_forward_flops_by_hand_for_the_testing_config():
  # 16 patches of 49 pixels -> width 16: 12,544 multiply-adds; one layer over 17 tokens:
  # Q/K/V 13,056, QK^T and AV 9,248, to_out 4,352, MLP 17,408; head 160. Doubled: 113,536.
  c = get_model_config("testing")
  assert benchmark.forward_flops(c) == 113_536
  assert benchmark.train_flops(c) == 3 * 113_536
  # Patches overlapping by 1 pixel: 81 pixels each, 16 x 32 x 16 more multiply-adds.
  overlapping = get_model_config("testing", patch_overlap=1)
  assert benchmark.forward_flops(overlapping) == 113_536 + 2 * 16 * 32 * 16


@pytest.mark.parametrize("qkv", ["fused", "identity", "identity_v", "tied_qk", "low_rank"])
def test_forward_flops_count_each_mode_s_projections_as_xla_does(qkv):
  from vit_jax import models

  c = get_model_config("seed", num_layers=2, qkv=qkv, attention_kernel="einsum",
                       qkv_rank=4 if qkv == "low_rank" else None)
  images = jax.numpy.zeros((8, 28, 28, 1))
  params = models.ViT(c).init(jax.random.PRNGKey(0), images)
  xla = benchmark.xla_flops(jax.jit(models.ViT(c).apply).lower(params, images).compile()) / 8
  ours = benchmark.forward_flops(c)
  # XLA also counts softmax, LayerNorm and GELU: a few percent more, never less.
  assert 0 <= (xla - ours) / ours < 0.08, (ours, xla)


def test_the_peak_probe_times_its_own_product():
  peak = benchmark.MatmulPeak("float32", size=512)
  assert peak.flops == 2 * 512**3
  peak.probe()
  peak.probe()
  assert len(peak.measured) == 2
  # Independently: twenty products in a row, waited for once at the end. A probe that timed
  # only the dispatch (no wait for the result) would claim many times this speed. The best
  # of three such rounds: one round (50 ms) can be slowed by other work on a shared machine.
  def sustained_rate():
    start = time.perf_counter()
    jax.block_until_ready([peak.matmul(peak.a, peak.b) for _ in range(20)])
    return 20 * peak.flops / (time.perf_counter() - start)

  sustained = max(sustained_rate() for _ in range(3))
  assert max(peak.measured) < 3 * sustained, (peak.measured, sustained)
  # On an accelerator a 2048 product takes microseconds: its launch, not the chip, would set
  # the "peak" and overstate every MFU.
  assert benchmark.peak_matmul_size("gpu") == benchmark.peak_matmul_size("tpu") == 8192
  assert benchmark.MatmulPeak("float32").size == 2048  # on this CPU


@pytest.mark.slow
@pytest.mark.parametrize("qkv,compute_dtype,overlap", [
    ("fused", "float32", 0), ("identity", "float32", 0), ("identity_v", "float32", 0),
    ("tied_qk", "float32", 0), ("fused", "bfloat16", 0), ("fused", "float32", 2)])
def test_matmul_only_step_does_the_models_matmul_work(qkv, compute_dtype, overlap):
  # The ceiling is only a ceiling if it multiplies the same matrices as the model.
  c = get_model_config("seed", num_layers=2, qkv=qkv, compute_dtype=compute_dtype,
                       patch_overlap=overlap)
  loss, params, patches = ceiling.matmul_only_problem(c, batch_size=8)
  for fn, ours in ((jax.jit(loss), benchmark.forward_flops(c)),
                   (jax.jit(jax.grad(loss)), benchmark.train_flops(c))):
    xla = benchmark.xla_flops(fn.lower(params, patches).compile()) / 8
    assert abs(xla - ours) / ours < FLOP_TOLERANCE, (ours, xla)
  assert np.isfinite(loss(params, patches))


@pytest.mark.slow
@pytest.mark.parametrize("parallel,microbatch_size", [("jit", None), ("pmap", None),
                                                     ("shard", None), ("pmap", 16)])
def test_benchmark_runs_and_counts_flops_like_xla(parallel, microbatch_size):
  # 32 examples per device: XLA counts the per-device work that is not the model's (the
  # optimizer; the flat buffer that `steps.mean_over_devices` concatenates and slices, which
  # it apparently charges by the buffer's size for every array) per device, not per image.
  # The micro-batched run takes the fused attention kernel where it builds, as mnist.py does
  # (an explicit 'fused_cpu' that cannot run is refused: tests/test_auto.py).
  kernel = "fused_cpu" if microbatch_size and _kernel_available() else "einsum"
  config = ExperimentConfig(model=get_model_config("seed", num_layers=2, attention_kernel=kernel),
                            batch_size=256, microbatch_size=microbatch_size, eval_batch_size=64,
                            parallel=parallel, eval_max_shift=1)
  result = benchmark.run(config, windows=2, steps_per_window=2,
                         with_compile_times=parallel == "jit")
  # One view of each image is timed, and the result says what the config's views would cost.
  assert (result["eval_views_timed"], result["eval_views_of_config"]) == (1, 9)
  ran_kernel = kernel == "fused_cpu"
  # XLA cannot see into the kernel's custom call: its count lacks QK^T and AV, 2 n^2 d each.
  n, c = config.model.num_tokens, config.model
  hidden = 2 * 2 * n * n * c.hidden_size * c.num_layers if ran_kernel else 0
  for key, forwards in (("train", 3), ("eval", 1)):  # training: forward and backward, 3x
    ours, xla = result[f"{key}_flops_per_image"], result[f"xla_{key}_flops_per_image"]
    assert abs(xla - (ours - forwards * hidden)) / ours < FLOP_TOLERANCE, (key, ours, xla)
  # A share of the peak above 1 would mean FLOPs or seconds miscounted (1.5: the peak's
  # probes and the steps share a noisy machine).
  for key in ("train_mfu", "eval_mfu", "matmul_only_train_mfu", "matmul_only_eval_mfu"):
    assert 0 < result[key] < 1.5, (key, result[key])
  assert result["matmul_peak_size"] == 2048  # the CPU's probe
  # Evaluation passes of twice a micro-batch of 16 (`auto`), or a device's whole share.
  assert result["eval_images_per_pass"] == min(32, config.eval_batch_size // result["devices"])
  # The step holds at least its parameters and AdamW's two moments, float32.
  params = 3 * 4 * (2 * 64 * 64 * 3 + 2 * 64 * 64 + 4 * 64 * 128) / 2**20
  assert params < result["train_step_peak_megabytes"] < result["peak_rss_megabytes"]
  if parallel == "jit":  # the persistent cache must spare most of a compile
    assert 0 < result["compile_cached_seconds"] < result["compile_cold_seconds"]
  assert "| train_mfu |" in benchmark.table(result)
  assert result["speedup_over_plain_flax"] == pytest.approx(
      result["train_images_per_sec"] / result["baseline_train_images_per_sec"])
  assert result["attention_kernel"] == ("fused_cpu" if ran_kernel else "einsum")
  assert result["attention_kernel_lanes"] in ((8, 16) if ran_kernel else (None,))
  # Three seeds in one vmapped step, each seed's images/s against the one run's.
  assert result["vmapped_seeds"] == 3 and result["vmapped_train_images_per_sec_per_seed"] > 0
  assert result["vmapped_seeds_speedup"] == pytest.approx(
      result["vmapped_train_images_per_sec_per_seed"] / result["train_images_per_sec"])


@pytest.mark.slow
def test_the_scaling_benchmark_varies_one_thing_a_row():
  from vit_jax.benchmark import scaling

  config = ExperimentConfig(model=get_model_config("testing", hidden_size=32, num_heads=2),
                            batch_size=32, eval_batch_size=32, parallel="jit")
  wider = scaling.variant(config, "hidden_size", 64)
  assert (wider.model.hidden_size, wider.model.mlp_dim) == (64, 2 * config.model.mlp_dim)
  overlapping = dataclasses.replace(config, model=get_model_config("testing", patch_overlap=4))
  assert scaling.variant(overlapping, "patch_size", 2).model.patch_overlap == 2
  axes = {"num_heads": (4, 16), "patch_size": (7, 14), "batch_size": (16,)}
  so_far = []
  result = scaling.run(config, steps_per_window=1, windows=1, axes=axes,
                       after_row=lambda partial: so_far.append(len(partial["rows"])))
  assert so_far == [1, 2, 3, 4, 5]  # what an interrupted table has kept
  rows = result["rows"]
  assert [(r["varied"], r["heads"], r["head_dim"], r["tokens"], r["batch"]) for r in rows] == [
      ("num_heads", 4, 8, 17, 32), ("num_heads", 16, 2, 17, 32),
      ("patch_size", 2, 16, 17, 32), ("patch_size", 2, 16, 5, 32), ("batch_size", 2, 16, 17, 16)]
  assert all(r["train_images_per_sec"] > 0 and 0 < r["train_mfu"] < 1.5 for r in rows)
  for r in rows:  # every row against the one peak the result records
    assert r["train_mfu"] == pytest.approx(
        r["train_images_per_sec"] * r["train_flops_per_image"] / result["matmul_peak_flops"])
  assert 0.05 < result["heads_16_over_4"] < 20  # interleaved, apart from the rows
  # The same step against itself, interleaved: even on a shared machine, about 1.
  from vit_jax.parallel import Runner

  assert 0.5 < scaling.interleaved_speedup(config, config, Runner("jit"), 1, 5) < 2
  assert scaling.table(result).count("\n") == len(rows) + 1


def test_a_scaling_row_that_cannot_be_is_refused_before_any_is_measured(monkeypatch):
  from vit_jax.benchmark import scaling

  monkeypatch.setattr(scaling, "measure", lambda *a: pytest.fail("a row was measured"))
  config = ExperimentConfig(model=get_model_config("testing", hidden_size=48, num_heads=2),
                            parallel="jit")  # 48 wide: 4 heads split it, 32 do not
  with pytest.raises(ValueError, match="the scaling row num_heads=32: .*num_heads=32"):
    scaling.run(config, axes={"num_heads": (4, 32)})


def test_alternating_ratio_cancels_what_going_first_in_a_round_does(monkeypatch):
  from vit_jax.kernels import timing

  clock = {"now": 0.0, "calls": 0}
  monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["now"])

  def taking(seconds):  # a call of `seconds`, 10 % longer when it is a round's first
    def call():
      clock["calls"] += 1
      clock["now"] += seconds * (1.1 if clock["calls"] % 2 else 1.0)
    return call

  assert timing.alternating_ratio(taking(2.0), taking(1.0), rounds=6) == pytest.approx(2.0)
  assert timing.alternating_ratio(taking(2.0), taking(1.0), rounds=1) == pytest.approx(2.2)


def _kernel_available() -> bool:
  from vit_jax.kernels import fused_attention

  return fused_attention.available()



def test_the_plain_flax_baseline_has_our_shape_plus_flaxs_qkv_biases():
  import jax
  import jax.numpy as jnp

  from vit_jax import models
  from vit_jax.benchmark import baseline

  images = jnp.zeros((2, 28, 28, 1))
  for config, count in ((get_model_config("seed"), 204_810),
                        (get_model_config("seed", patch_overlap=2), 204_810 + 48 * 64)):
    plain = jax.eval_shape(baseline.PlainViT(config).init, jax.random.PRNGKey(0), images)
    ours = jax.eval_shape(models.ViT(config).init, jax.random.PRNGKey(0), images)
    extra = 3 * config.hidden_size * config.num_layers
    assert models.count_params(plain) == models.count_params(ours) + extra == count + extra
    assert jax.eval_shape(baseline.PlainViT(config).apply, plain, images).shape == (2, 10)


def test_the_baseline_says_where_our_model_is_not_its_own():
  from vit_jax.benchmark import baseline
  from vit_jax.experiment_config import ExperimentConfig

  def config(**fields):
    return ExperimentConfig(model=get_model_config("seed", **fields))

  assert baseline.differences(config()) == baseline.differences(config(qkv="separate")) == []
  assert baseline.differences(config(qkv="identity", classifier="gap", dropout_rate=0.1)) == [
      "model.qkv='identity'", "model.classifier='gap'", "model.dropout_rate=0.1"]
