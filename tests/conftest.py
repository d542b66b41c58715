"""Shared fixtures: eight fake CPU devices, and MNIST built offline once per session."""

import os

# Must happen before JAX initialises its backend: pmap tests need several devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MNIST_IDX_DIR = REPO.parent / "shared" / "data" / "mnist"

logging.getLogger("absl").setLevel(logging.WARNING)


# Tests that read the real MNIST files, build the fused attention kernel (seconds to a minute
# once per session) or damage a trained run (test_faults.py) are `slow`: `make test-fast` runs
# without them. So are those marked by hand that train for more than a few steps (over about
# 5 s each on a 2-core machine), so that the edit loop's tier takes minutes, not a quarter hour.
SLOW_FIXTURES = {"mnist", "tfds_dir", "kernel", "finished"}


def pytest_collection_modifyitems(items):
  for item in items:
    if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def no_kernel_build_in_the_fast_tier(request, monkeypatch):
  """A test not marked slow that would build the fused kernel fails, naming why: the build
  took minutes of `make test-fast` unseen. Fake the kernel (tests/test_auto.py's
  `kernel_speedup`) or take the `kernel` fixture, which marks the test slow."""
  if request.node.get_closest_marker("slow") is None:
    from vit_jax.kernels import fused_attention

    build = fused_attention.build

    def refuse_a_built_kernel(*args, **kwargs):
      build(*args, **kwargs)  # a build that fails (tests/test_kernel_build.py) raises here
      pytest.fail("a test not marked slow builds the fused attention kernel", pytrace=False)

    monkeypatch.setattr(fused_attention, "build", refuse_a_built_kernel)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache_dir(tmp_path_factory):
  """JAX's persistent compilation cache, in a temporary folder, not the user's ~/.cache."""
  path = tmp_path_factory.mktemp("xla_cache")
  os.environ["VIT_JAX_COMPILATION_CACHE_DIR"] = str(path)  # read by launch.py subprocesses
  # In this process too: many tests compile the same small steps again (each run makes its
  # own jitted functions), and a cache hit takes a fraction of a compile.
  import jax

  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  return path


@pytest.fixture(scope="session", autouse=True)
def kernel_cache_dir(tmp_path_factory):
  """The fused attention kernel, built once per session in a temporary folder (subprocesses too)."""
  path = tmp_path_factory.mktemp("kernels")
  os.environ["VIT_JAX_CACHE_DIR"] = str(path)
  return path


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
  """A TFDS data dir holding `mnist`, built offline from the shared IDX files."""
  from vit_jax import mnist_source

  if not MNIST_IDX_DIR.is_dir():
    pytest.fail(f"{MNIST_IDX_DIR} is missing: the tests need the four MNIST IDX files there")
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  mnist_source.builder("mnist", data_dir=data_dir, idx_dir=str(MNIST_IDX_DIR))
  return data_dir


@pytest.fixture(scope="session")
def mnist(tfds_dir):
  """{'train': {'image', 'label'}, 'test': {...}}: full MNIST as arrays."""
  from vit_jax import mnist_source

  out = {}
  for split in ("train", "test"):
    images, labels = mnist_source.load_split("mnist", split, tfds_dir, idx_dir=None)
    out[split] = {"image": images, "label": labels}
  return out


@pytest.fixture(scope="session")
def digits() -> dict:
  """Synthetic data shaped like the `mnist` fixture's, with no files and no TFDS build (in the
  spirit of `tfds.testing.mock_data`): 2,048 training and 512 test images, each class a fixed
  random pattern of grey levels under noise, which a model trained without random shifts
  (`augment_max_shift=0`) learns within a few dozen steps."""
  import numpy as np

  rng = np.random.default_rng(0)
  patterns = rng.integers(0, 256, (10, 28, 28, 1))

  def split(n):
    labels = rng.integers(0, 10, n).astype(np.int32)
    noise = rng.integers(0, 256, (n, 28, 28, 1))
    images = (0.7 * patterns[labels] + 0.3 * noise).astype(np.uint8)
    return {"image": images, "label": labels}

  return {"train": split(2048), "test": split(512)}
