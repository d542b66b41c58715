"""'auto' choices: made once at the start, recorded in config.json, an explicit value stands."""

import dataclasses
import json

import jax
import pytest

from vit_jax import auto, host_cpu, inference, kernels, models, steps, train
from vit_jax.experiment_config import ExperimentConfig
from vit_jax.kernels import fused_attention, timing
from vit_jax.model_configs import FUSED_QKV_MODES, QKV_MODES, get_model_config
from vit_jax.parallel import Runner
from vit_jax.workdir import saved_config, write_or_check_config

SEED_SHAPE = get_model_config("seed", attention_kernel="auto")  # heads of 16 over 50 tokens


@pytest.fixture
def kernel_speedup(monkeypatch):
  """Fakes the kernel as built, and its measured speedup over einsum as `value`."""
  def set_speedup(value):
    monkeypatch.setattr(fused_attention, "load", lambda: None)
    monkeypatch.setattr(timing, "speedup_over_einsum", lambda *probe: value)
  return set_speedup


@pytest.mark.parametrize("speedup,chosen", [(1.6, "fused_cpu"), (1.1, "fused_cpu"),
                                            (1.02, "einsum"), (0.8, "einsum")])
def test_auto_takes_the_kernel_only_where_it_measures_faster(kernel_speedup, speedup, chosen):
  kernel_speedup(speedup)
  kernel, why = auto.choose_attention_kernel(SEED_SHAPE, microbatch=16)
  assert kernel == chosen and f"{speedup:.2f}x" in why


@pytest.mark.parametrize("overrides,reason", [
    ({"num_heads": 8, "hidden_size": 96}, "not 12 over 50"),  # heads of 12: not the kernel's
])
def test_auto_takes_einsum_where_the_kernel_cannot_run(kernel_speedup, overrides, reason):
  kernel_speedup(10.0)  # however fast it would be
  kernel, why = auto.choose_attention_kernel(dataclasses.replace(SEED_SHAPE, **overrides), 16)
  assert kernel == "einsum" and reason in why


def test_auto_takes_einsum_off_cpus_and_where_the_kernel_does_not_build(monkeypatch):
  monkeypatch.setattr(fused_attention, "load", lambda: "no C++ compiler 'g++' on PATH")
  kernel, why = auto.choose_attention_kernel(SEED_SHAPE, 16)
  assert kernel == "einsum" and "unavailable: no C++ compiler" in why
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  kernel, why = auto.choose_attention_kernel(SEED_SHAPE, 16)
  assert kernel == "einsum" and "this is a gpu" in why


def test_an_explicit_kernel_stands(kernel_speedup):
  kernel_speedup(10.0)
  for name in kernels.KERNELS:
    model = dataclasses.replace(SEED_SHAPE, attention_kernel=name)
    assert auto.choose_attention_kernel(model, 16) == (name, "as configured")


def test_resolve_measures_the_micro_batch_a_device_takes(monkeypatch):
  shapes = []
  monkeypatch.setattr(fused_attention, "load", lambda: None)
  monkeypatch.setattr(timing, "speedup_over_einsum",
                      lambda *probe: shapes.append(probe) or 2.0)
  config = ExperimentConfig(model=SEED_SHAPE, batch_size=128, microbatch_size=16)
  resolved, line = auto.resolve(config, num_devices=2)
  assert resolved.model.attention_kernel == "fused_cpu"
  assert dataclasses.replace(resolved, model=SEED_SHAPE) == config  # nothing else changed
  assert shapes == [((16, 4, 50, 16), "float32", True)]
  assert line.startswith("2 cpu devices, float32 products (as configured), micro-batches of "
                         "16 per device (as configured), attention fused_cpu (")
  whole_share, _ = auto.resolve(dataclasses.replace(config, microbatch_size=None), 2)
  assert shapes[-1] == ((64, 4, 50, 16), "float32", True)  # each device's half of the batch


def test_the_kernel_is_timed_in_the_precision_the_run_chose(monkeypatch):
  probes = []
  monkeypatch.setattr(fused_attention, "load", lambda: None)
  monkeypatch.setattr(host_cpu, "has_bfloat16_units", lambda: True)
  monkeypatch.setattr(timing, "speedup_over_einsum",
                      lambda *probe: probes.append(probe) or 2.0)
  model = dataclasses.replace(SEED_SHAPE, compute_dtype="auto")
  auto.resolve(ExperimentConfig(model=model, batch_size=128, microbatch_size=16), num_devices=2)
  assert probes == [((16, 4, 50, 16), "bfloat16", True)]


@pytest.mark.parametrize("qkv", QKV_MODES)
def test_the_kernel_is_timed_with_q_k_v_as_the_model_makes_them(monkeypatch, qkv):
  """Fused: chunked out of one product, which the kernel reads in place; any other mode: apart,
  which it concatenates (`models.projection_weights` says which has the one `to_qkv`)."""
  probes = []
  monkeypatch.setattr(fused_attention, "load", lambda: None)
  monkeypatch.setattr(timing, "speedup_over_einsum", lambda *probe: probes.append(probe) or 2.0)
  model = dataclasses.replace(SEED_SHAPE, qkv=qkv, qkv_rank=2 if qkv == "low_rank" else None)
  auto.choose_attention_kernel(model, 16)
  layer = models.MultiHeadSelfAttention(4, qkv, qkv_rank=model.qkv_rank)
  owned = layer.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 5, 64)))["params"]
  one_product = "to_qkv" in models.projection_weights(owned, qkv, 64, "block0/attention")
  assert probes == [((16, 4, 50, 16), "float32", one_product)]
  assert one_product == (qkv in FUSED_QKV_MODES)


def test_a_model_refuses_an_unresolved_auto():
  module = models.MultiHeadSelfAttention(4, attention_kernel="auto")
  with pytest.raises(ValueError, match="'auto' is chosen when a run starts"):
    module.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 5, 64)))


@pytest.mark.slow
def test_a_run_records_its_choice_and_may_resume_with_another(tmp_path, digits, kernel_speedup,
                                                              capsys):
  kernel_speedup(1.0)  # no faster: einsum
  model = get_model_config("testing", hidden_size=32, attention_kernel="auto")  # heads of 16
  config = ExperimentConfig(model=model, batch_size=64, num_epochs=1, train_examples=128,
                            eval_batch_size=256, parallel="jit")
  train.train_and_evaluate(config, tmp_path, data=digits)
  assert ("running on 1 cpu device, float32 products (as configured), micro-batches of 64 "
          "per device (as configured), attention einsum (the fused kernel measured 1.00x"
          ) in capsys.readouterr().err
  assert json.loads((tmp_path / "config.json").read_text())["model"]["attention_kernel"] \
      == "einsum"
  # Resuming, evaluating or drawing it computes as it did, however fast the kernel now measures.
  kernel_speedup(5.0)
  assert auto.choose_attention_kernel(model, 64)[0] == "fused_cpu"
  resumed, line = auto.resolve(config, 1, saved_config(tmp_path))
  assert resumed.model.attention_kernel == "einsum" and "as this workdir's run chose" in line
  assert inference.resolved_config(config, tmp_path).model.attention_kernel == "einsum"
  # The kernel changes no parameter: the same workdir may continue on a machine that takes it.
  other = dataclasses.replace(config, model=dataclasses.replace(model,
                                                                attention_kernel="fused_cpu"))
  write_or_check_config(tmp_path, other)
  # Nor does the products' precision (the parameters are float32 either way): a bfloat16 run
  # may go on in float32 where bfloat16 cannot run.
  write_or_check_config(tmp_path, dataclasses.replace(other, model=dataclasses.replace(
      other.model, compute_dtype="bfloat16")))
  with pytest.raises(ValueError, match="different model"):
    write_or_check_config(tmp_path, dataclasses.replace(other, model=dataclasses.replace(
        model, num_heads=1)))


@pytest.fixture
def platform(monkeypatch):
  """Fakes the backend ('cpu', 'gpu', 'tpu') and the CPU's /proc/cpuinfo flags."""
  def set_platform(backend, cpu_flags="avx2 fma"):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(host_cpu, "cpu_flags", lambda: cpu_flags)
  return set_platform


@pytest.mark.parametrize("backend,cpu_flags,dtype", [
    ("cpu", "avx2 fma", "float32"),                             # e.g. Zen 3
    ("cpu", "avx2 fma avx512f avx512_bf16", "bfloat16"),        # AVX-512 BF16
    ("cpu", "avx2 fma avx512f amx_bf16", "bfloat16"),           # AMX
    ("gpu", "avx2 fma", "bfloat16"),
    ("tpu", "avx2 fma", "bfloat16"),
])
def test_auto_takes_bfloat16_only_where_the_hardware_multiplies_it(platform, backend,
                                                                   cpu_flags, dtype):
  platform(backend, cpu_flags)
  model = dataclasses.replace(SEED_SHAPE, compute_dtype="auto")
  assert auto.choose_compute_dtype(model)[0] == dtype


def test_an_explicit_dtype_stands_and_emulated_bfloat16_says_so(platform):
  platform("cpu", "avx2 fma")
  assert auto.choose_compute_dtype(SEED_SHAPE) == ("float32", "as configured")
  dtype, why = auto.choose_compute_dtype(dataclasses.replace(SEED_SHAPE,
                                                              compute_dtype="bfloat16"))
  assert dtype == "bfloat16" and "no bfloat16 units: XLA emulates them" in why


def test_an_explicit_kernel_that_cannot_run_is_one_line(monkeypatch):
  model = dataclasses.replace(SEED_SHAPE, attention_kernel="fused_cpu")
  monkeypatch.setattr(fused_attention, "load", lambda: "no C++ compiler 'g++' on PATH")
  with pytest.raises(ValueError, match=r"^model.attention_kernel='fused_cpu' cannot run here: "
                     r"no C\+\+ compiler 'g\+\+' on PATH \(use 'auto' or 'einsum'\)$"):
    auto.choose_attention_kernel(model, 16)
  monkeypatch.setattr(fused_attention, "load", lambda: None)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ValueError, match=r"^model.attention_kernel='fused_cpu' runs on CPUs "
                     r"only, this is a gpu \(use 'auto' or 'einsum'\)$"):
    auto.choose_attention_kernel(model, 16)
  # A CPU run's recorded choice, evaluated on a GPU, is no error: there the einsum path
  # computes the same attention, and the line says so.
  config = ExperimentConfig(model=SEED_SHAPE)
  resolved, line = auto.resolve(config, recorded={"model": {"attention_kernel": "fused_cpu"}})
  assert resolved.model.attention_kernel == "einsum"
  assert line.endswith("attention einsum (this workdir's run chose fused_cpu, which runs on "
                       "CPUs only, this is a gpu; the same maths)")


def test_bfloat16_that_xla_cannot_run_is_one_line(monkeypatch):
  assert auto.bfloat16_failure() is None  # XLA's CPU backend computes it, if slowly
  monkeypatch.setattr(auto, "bfloat16_failure", lambda: "UNIMPLEMENTED: no bf16 dot")
  with pytest.raises(ValueError, match=r"^model.compute_dtype='bfloat16' cannot run on this "
                     r"cpu: UNIMPLEMENTED: no bf16 dot \(use 'float32' or 'auto'\)$"):
    auto.choose_compute_dtype(dataclasses.replace(SEED_SHAPE, compute_dtype="bfloat16"))
  # A run that recorded bfloat16, continued where it cannot run: one line, not XLA's.
  config = ExperimentConfig(model=dataclasses.replace(SEED_SHAPE, compute_dtype="auto"))
  with pytest.raises(ValueError, match=r"^this workdir's run computed in bfloat16, which "
                     r"cannot run on this cpu: UNIMPLEMENTED: no bf16 dot \(pass "
                     r"--config.model.compute_dtype=float32"):
    auto.resolve(config, recorded={"model": {"compute_dtype": "bfloat16"}})


@pytest.mark.parametrize("model,per_device,size", [
    (SEED_SHAPE, 64, 16),                                  # 50 tokens x 64: measured best 16
    (get_model_config("fast"), 64, 16),                    # 17 x 128: measured best 16
    (get_model_config("sprint"), 64, 32),                  # 17 x 64: measured best 32
    (SEED_SHAPE, 50, 10),                                  # the largest divisor that fits
    (SEED_SHAPE, 20, 10),                                  # 10 of the 16 that fit
    (SEED_SHAPE, 127, None),                               # prime: not 127 passes of one
    (SEED_SHAPE, 74, None),                                # 2 is under a quarter of 16
    (SEED_SHAPE, 1018, 2),                                 # but the whole is 64x what fits
    (SEED_SHAPE, 8, None),                                 # the whole share fits
])
def test_auto_micro_batches_are_cache_sized_on_cpus(platform, model, per_device, size):
  platform("cpu")
  config = ExperimentConfig(model=model, microbatch_size="auto")
  assert auto.choose_microbatch_size(config, per_device)[0] == size


def test_auto_micro_batches_take_the_whole_share_on_accelerators_and_explicit_stands(platform):
  platform("gpu")
  assert auto.choose_microbatch_size(ExperimentConfig(model=SEED_SHAPE,
                                                      microbatch_size="auto"), 64)[0] is None
  platform("cpu")
  assert auto.choose_microbatch_size(ExperimentConfig(model=SEED_SHAPE, microbatch_size=8),
                                     64) == (8, "as configured")


@pytest.mark.parametrize("backend,model,images", [
    ("cpu", SEED_SHAPE, 32),                     # twice a training micro-batch: measured best
    ("cpu", get_model_config("best"), 16),       # 50 tokens x 128
    ("cpu", get_model_config("sprint"), 94),     # 17 tokens x 64
    ("gpu", SEED_SHAPE, 0),                      # the whole share
    ("tpu", SEED_SHAPE, 0),
])
def test_evaluation_passes_are_cache_sized_on_cpus_and_whole_elsewhere(platform, backend, model,
                                                                       images):
  platform(backend)
  assert auto.eval_images_per_pass(model) == images


def test_resolve_records_every_choice_and_a_resumed_run_keeps_its_precision(platform,
                                                                             kernel_speedup):
  platform("cpu", "avx2 fma avx512f avx512_bf16")
  kernel_speedup(2.0)
  config = ExperimentConfig(model=dataclasses.replace(SEED_SHAPE, compute_dtype="auto"),
                            batch_size=128, microbatch_size="auto")
  resolved, line = auto.resolve(config, num_devices=2)
  assert (resolved.model.compute_dtype, resolved.microbatch_size,
          resolved.model.attention_kernel) == ("bfloat16", 16, "fused_cpu")
  assert line.startswith("2 cpu devices, bfloat16 products (this CPU multiplies bfloat16")
  assert "micro-batches of 16 per device (16 of 50 tokens x 64 fit" in line
  platform("cpu", "avx2 fma")  # the same workdir continued on a CPU without bfloat16 units
  recorded = {"model": {"compute_dtype": "bfloat16", "attention_kernel": "einsum"}}
  resumed, line = auto.resolve(config, 2, recorded)
  assert resumed.model.compute_dtype == "bfloat16" and "as this workdir's run chose" in line
  assert resumed.model.attention_kernel == "einsum"


@pytest.mark.parametrize("recorded, size, why", [
    (32, 32, "as this workdir's run chose"),  # not the 16 that fits: the dropout draws stay
    (None, None, "the whole share, as this workdir's run chose"),
    ("absent", 16, "16 of 50 tokens x 64 fit"),  # a run older than the field: chosen here
])
def test_a_resumed_run_keeps_its_micro_batch_size(platform, kernel_speedup, recorded, size,
                                                  why):
  platform("cpu", "avx2 fma")
  kernel_speedup(1.0)
  config = ExperimentConfig(model=SEED_SHAPE, batch_size=128, microbatch_size="auto")
  saved = {"model": {}} if recorded == "absent" else {"model": {}, "microbatch_size": recorded}
  resumed, line = auto.resolve(config, 2, saved)
  assert resumed.microbatch_size == size
  assert f"micro-batches of {size or 64} per device ({why}" in line
  explicit = dataclasses.replace(config, microbatch_size=8)  # an explicit size still wins
  assert auto.resolve(explicit, 2, saved)[0].microbatch_size == 8


def test_a_recorded_micro_batch_size_that_no_longer_divides_a_share_is_chosen_again(
    platform, kernel_speedup):
  platform("cpu", "avx2 fma")
  kernel_speedup(1.0)
  config = ExperimentConfig(model=SEED_SHAPE, batch_size=200, microbatch_size="auto")
  # 16 suited 128 on 2 devices; resumed with batches of 200 (100 a device), 16 cannot split.
  resumed, line = auto.resolve(config, 2, {"model": {}, "microbatch_size": 16})
  assert resumed.microbatch_size == 10 and "micro-batches of 10 per device (10 of 50" in line


def test_unresolved_autos_are_refused_where_they_would_compute():
  with pytest.raises(ValueError, match="compute_dtype='auto' is chosen when a run starts"):
    models.ViT(dataclasses.replace(SEED_SHAPE, compute_dtype="auto", attention_kernel="einsum")
               ).init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 28, 28, 1)))
  config = ExperimentConfig(model=get_model_config("testing"), microbatch_size="auto")
  with pytest.raises(ValueError, match="microbatch_size='auto' is chosen when a run starts"):
    steps.compile_train_steps(config, Runner("jit"))
