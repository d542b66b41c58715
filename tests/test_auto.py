"""'auto' choices: made once at the start, recorded in config.json, an explicit value stands."""

import dataclasses
import json

import jax
import pytest

from vit_jax import auto, inference, kernels, models, train
from vit_jax.checkpoints import saved_config, write_or_check_config
from vit_jax.experiment_config import ExperimentConfig
from vit_jax.kernels import fused_attention, timing
from vit_jax.model_configs import get_model_config

SEED_SHAPE = get_model_config("seed", attention_kernel="auto")  # heads of 16 over 50 tokens


@pytest.fixture
def kernel_speedup(monkeypatch):
  """Fakes the kernel as built, and its measured speedup over einsum as `value`."""
  def set_speedup(value):
    monkeypatch.setattr(fused_attention, "load", lambda: None)
    monkeypatch.setattr(timing, "speedup_over_einsum", lambda shape: value)
  return set_speedup


@pytest.mark.parametrize("speedup,chosen", [(1.6, "fused_cpu"), (1.05, "einsum")])
def test_auto_takes_the_kernel_only_where_it_measures_faster(kernel_speedup, speedup, chosen):
  kernel_speedup(speedup)
  kernel, why = auto.choose_attention_kernel(SEED_SHAPE, microbatch=16)
  assert kernel == chosen and f"{speedup:.2f}x" in why


@pytest.mark.parametrize("overrides,reason", [
    ({"compute_dtype": "bfloat16"}, "computes in float32, not bfloat16"),
    ({"num_heads": 8}, "not 8 over 50"),  # heads of 8: not the kernel's
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
  monkeypatch.setattr(timing, "speedup_over_einsum", lambda shape: shapes.append(shape) or 2.0)
  config = ExperimentConfig(model=SEED_SHAPE, batch_size=128, microbatch_size=16)
  resolved, line = auto.resolve(config, num_devices=2)
  assert resolved.model.attention_kernel == "fused_cpu"
  assert dataclasses.replace(resolved, model=SEED_SHAPE) == config  # nothing else changed
  assert shapes == [(16, 4, 50, 16)]
  assert line.startswith("2 cpu devices, float32 products, micro-batches of 16 per device, "
                         "attention fused_cpu (")
  whole_share, _ = auto.resolve(dataclasses.replace(config, microbatch_size=None), 2)
  assert shapes[-1] == (64, 4, 50, 16)  # no micro-batches: each device's half of the batch


def test_a_model_refuses_an_unresolved_auto():
  module = models.MultiHeadSelfAttention(4, attention_kernel="auto")
  with pytest.raises(ValueError, match="'auto' is chosen when a run starts"):
    module.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 5, 64)))


def test_a_run_records_its_choice_and_may_resume_with_another(tmp_path, digits, kernel_speedup,
                                                              capsys):
  kernel_speedup(1.0)  # no faster: einsum
  model = get_model_config("testing", hidden_size=32, attention_kernel="auto")  # heads of 16
  config = ExperimentConfig(model=model, batch_size=64, num_epochs=1, train_examples=128,
                            eval_batch_size=256, parallel="jit")
  train.train_and_evaluate(config, tmp_path, data=digits)
  assert ("running on 1 cpu device, float32 products, micro-batches of 64 per device, "
          "attention einsum (the fused kernel measured 1.00x") in capsys.readouterr().err
  assert json.loads((tmp_path / "config.json").read_text())["model"]["attention_kernel"] \
      == "einsum"
  # Resuming, evaluating or drawing it computes as it did, however fast the kernel now measures.
  kernel_speedup(5.0)
  assert auto.choose_attention_kernel(model, 64)[0] == "fused_cpu"
  resumed, line = auto.resolve(config, 1, saved_config(tmp_path))
  assert resumed.model.attention_kernel == "einsum" and "its config.json" in line
  assert inference.resolved_config(config, tmp_path).model.attention_kernel == "einsum"
  # The kernel changes no parameter: the same workdir may continue on a machine that takes it.
  other = dataclasses.replace(config, model=dataclasses.replace(model,
                                                                attention_kernel="fused_cpu"))
  write_or_check_config(tmp_path, other)
  with pytest.raises(ValueError, match="different model"):
    write_or_check_config(tmp_path, dataclasses.replace(other, model=dataclasses.replace(
        model, num_heads=1)))
