"""The CPU split into devices: 'auto' is one per core, unless the batches say fewer."""

import pytest

from vit_jax import host_cpu


@pytest.fixture
def four_cores(monkeypatch):
  monkeypatch.setattr(host_cpu, "cores", lambda: 4)
  monkeypatch.delenv("XLA_FLAGS", raising=False)


def test_auto_takes_one_device_per_core(four_cores):
  assert host_cpu.count("auto", (128, 128))[0] == 4


def test_auto_takes_fewer_devices_where_a_batch_would_not_split_evenly(four_cores):
  devices, why = host_cpu.count("auto", (128, 1000 + 2))
  assert devices == 2
  assert "1002" in why


def test_an_explicit_count_wins_over_the_cores(four_cores):
  assert host_cpu.count("3", (128,)) == (3, "as configured")


@pytest.mark.parametrize("value", ["0", "-2", "two", ""])
def test_a_bad_count_is_one_line_naming_the_flag_and_value(four_cores, value):
  with pytest.raises(ValueError, match=rf"^--cpu_devices={value!r} must be 'auto'"):
    host_cpu.count(value)


def test_split_cpu_sets_xla_flags_and_keeps_what_was_there(four_cores, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  host_cpu.split_cpu(4)
  import os
  assert os.environ["XLA_FLAGS"] == ("--xla_dump_to=/tmp/x "
                                     "--xla_force_host_platform_device_count=4")


def test_a_device_count_in_xla_flags_wins(four_cores, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert host_cpu.configure("2", (128,)) == "XLA_FLAGS forces 8"
  assert host_cpu.forced_by_environment() == 8
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=eight")
  with pytest.raises(ValueError, match=r"^XLA_FLAGS sets --xla_force_host_platform_device_count"
                                       r"='eight', not a whole number of devices$"):
    host_cpu.forced_by_environment()


def test_one_device_leaves_xla_flags_alone(four_cores):
  import os
  host_cpu.split_cpu(1)
  assert "XLA_FLAGS" not in os.environ


def test_describe_names_the_model_and_only_known_extensions(monkeypatch):
  text = ("cpu family\t: 25\nmodel\t\t: 1\nmodel name\t: Some CPU\nstepping\t: 1\n"
          "flags\t\t: fpu avx2 fma sse4_2\n")
  monkeypatch.setattr(host_cpu.Path, "read_text", lambda self: text)
  assert host_cpu.describe()["cpu_model"] == "Some CPU"
  assert host_cpu.describe()["cpu_signature"] == "family 25 model 1 stepping 1"
  assert host_cpu.describe()["cpu_extensions"] == ["avx2", "fma"]
  assert not host_cpu.has_bfloat16_units()
