"""The input side: IDX files, the offline TFDS build, batch order, augmentation, images."""

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import MNIST_IDX_DIR

from vit_jax import input_pipeline, mnist_source
from vit_jax.mnist_source import DataError

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_offline_build_is_tfds_mnist_with_the_known_counts(tfds_dir, mnist):
  builder = tfds.builder("mnist", data_dir=tfds_dir)  # TFDS's own builder reads it
  assert builder.is_prepared()
  assert str(builder.info.version) == "3.0.1"
  assert builder.info.splits["train"].num_examples == 60000
  assert builder.info.splits["test"].num_examples == 10000
  assert builder.info.features["image"].shape == (28, 28, 1)
  assert mnist["train"]["image"].shape == (60000, 28, 28, 1)
  assert np.bincount(mnist["train"]["label"]).tolist() == TRAIN_COUNTS
  assert np.bincount(mnist["test"]["label"]).tolist() == TEST_COUNTS


def _image_label_pairs(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Each (image, label) as one byte row, sorted: equal for the same pairs in any order."""
  rows = np.ascontiguousarray(np.concatenate(
      [images.reshape(len(images), -1), labels.reshape(-1, 1).astype(np.uint8)], axis=1))
  return np.sort(rows.view(np.dtype((np.void, rows.shape[1]))).ravel())


@pytest.mark.parametrize("split", ["train", "test"])
def test_the_build_keeps_each_image_with_its_label(mnist, split):
  # TFDS reorders the examples; the counts above would not see labels shuffled among them.
  idx = mnist_source.read_idx_split("mnist", MNIST_IDX_DIR, split)
  built = _image_label_pairs(mnist[split]["image"], mnist[split]["label"])
  assert np.array_equal(built, _image_label_pairs(*idx))
  shuffled = np.random.default_rng(0).permutation(mnist[split]["label"])
  assert not np.array_equal(_image_label_pairs(mnist[split]["image"], shuffled), built)


def test_the_build_is_reused_not_redone(tfds_dir, monkeypatch):
  def no_rebuild(self, *args, **kwargs):
    raise AssertionError("rebuilt a prepared dataset")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_rebuild)
  assert mnist_source.builder("mnist", data_dir=tfds_dir, idx_dir=str(MNIST_IDX_DIR))\
      .is_prepared()


def test_a_loaded_split_is_kept_as_arrays_and_read_back_without_decoding(
    tfds_dir, mnist, monkeypatch):
  # The `mnist` fixture decoded both splits through TFDS, which left the array files.
  folder = Path(tfds.builder("mnist", data_dir=tfds_dir).data_dir)
  assert sorted(p.name for p in folder.glob("*.arrays.npz")) == [
      "test.arrays.npz", "train.arrays.npz"]

  def no_decode(self, *args, **kwargs):
    raise AssertionError("decoded the TFDS records again")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "as_dataset", no_decode)
  for split in ("train", "test"):
    images, labels = mnist_source.load_split("mnist", split, tfds_dir, idx_dir=None)
    np.testing.assert_array_equal(images, mnist[split]["image"])
    np.testing.assert_array_equal(labels, mnist[split]["label"])
    assert images.dtype == np.uint8 and labels.dtype == np.int32


@pytest.mark.parametrize("damage", ["truncate", "wrong_count"])
def test_a_damaged_array_file_is_decoded_again_and_rewritten(tfds_dir, mnist, tmp_path, damage):
  data_dir = tmp_path / "tfds"
  shutil.copytree(tfds_dir, data_dir)
  cache = Path(tfds.builder("mnist", data_dir=str(data_dir)).data_dir) / "test.arrays.npz"
  if damage == "truncate":
    cache.write_bytes(cache.read_bytes()[:1000])
  else:
    np.savez(cache, images=mnist["test"]["image"][:10], labels=mnist["test"]["label"][:10])
  images, labels = mnist_source.load_split("mnist", "test", str(data_dir), idx_dir=None)
  np.testing.assert_array_equal(images, mnist["test"]["image"])
  np.testing.assert_array_equal(labels, mnist["test"]["label"])
  with np.load(cache) as rewritten:
    np.testing.assert_array_equal(rewritten["labels"], mnist["test"]["label"])
  assert not list(cache.parent.glob("*.partial"))


@pytest.mark.slow
def test_normalisation_constants_match_the_data(mnist):
  spec = mnist_source.dataset_spec("mnist")
  scaled = mnist["train"]["image"] / 255.0
  assert scaled.mean() == pytest.approx(spec.mean, abs=5e-4)
  assert scaled.std() == pytest.approx(spec.std, abs=5e-4)


def test_unknown_dataset_or_split_is_named(monkeypatch):
  with pytest.raises(DataError, match="dataset='cifar10' is not supported"):
    mnist_source.dataset_spec("cifar10")
  with pytest.raises(DataError, match="split='validation' is not one of 'train', 'test'"):
    mnist_source.read_idx_split("mnist", MNIST_IDX_DIR, "validation")
  monkeypatch.setattr(mnist_source, "builder", None)  # named before anything is built
  with pytest.raises(DataError, match="split='validation' is not one of 'train', 'test'"):
    mnist_source.load_split("mnist", "validation")


# --- Batch order -----------------------------------------------------------------------

def test_epoch_order_covers_each_example_at_most_once_per_epoch_and_reshuffles():
  order = input_pipeline.EpochOrder(num_examples=1000, batch_size=64, seed=3)
  assert order.steps_per_epoch == 15
  epoch0 = np.concatenate([order.indices(s) for s in range(15)])
  epoch1 = np.concatenate([order.indices(s) for s in range(15, 30)])
  assert len(set(epoch0)) == len(epoch0) == 960
  assert len(set(epoch1)) == 960
  assert not np.array_equal(epoch0, epoch1)
  # A function of (seed, step) alone: a fresh object gives the same batch.
  np.testing.assert_array_equal(
      input_pipeline.EpochOrder(1000, 64, 3).indices(17), order.indices(17))
  assert not np.array_equal(input_pipeline.EpochOrder(1000, 64, 4).indices(17),
                            order.indices(17))
  with pytest.raises(ValueError, match="batch_size=20 must be between 1 and the number of "
                                       "examples, 10"):
    input_pipeline.EpochOrder(10, 20, 0)


@pytest.mark.parametrize("n,batch", [(10000, 1000), (10000, 768), (7, 3)])
def test_eval_indices_count_every_example_exactly_once(n, batch):
  seen = np.concatenate([idx[mask] for idx, mask in input_pipeline.eval_indices(n, batch)])
  np.testing.assert_array_equal(np.sort(seen), np.arange(n))
  assert all(len(idx) == batch for idx, _ in input_pipeline.eval_indices(n, batch))


# --- Augmentation ----------------------------------------------------------------------

def test_random_translate_shifts_within_bounds_and_never_flips():
  images = np.zeros((64, 28, 28, 1), np.uint8)
  images[:, 10:18, 12:14] = 255  # a bar away from the border
  images[:, 10, 12:16] = 255     # with an asymmetric top stroke
  keys = input_pipeline.example_keys(jax.random.PRNGKey(0), np.arange(64))
  out = np.asarray(input_pipeline.random_translate(images, keys, 3))
  shifts = set()
  for src, dst in zip(images, out, strict=True):
    found = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
             if np.array_equal(np.roll(src, (dy, dx), axis=(0, 1)), dst)]
    assert found, "output is not a translate of the input by at most 3 pixels"
    shifts.add(found[0])
  assert len(shifts) > 10  # images get different shifts
  for shift_images in (lambda: input_pipeline.random_translate(images, keys, -1),
                       lambda: input_pipeline.shifted_views(images, -1)):
    with pytest.raises(ValueError, match="max_shift=-1 must not be negative"):
      shift_images()


def test_random_translate_is_per_example_not_per_batch_split():
  images = np.random.default_rng(1).integers(0, 255, (8, 28, 28, 1)).astype(np.uint8)
  keys = input_pipeline.example_keys(jax.random.PRNGKey(5), np.arange(8))
  whole = input_pipeline.random_translate(images, keys, 2)
  halves = np.concatenate([input_pipeline.random_translate(images[:4], keys[:4], 2),
                           input_pipeline.random_translate(images[4:], keys[4:], 2)])
  np.testing.assert_array_equal(whole, halves)


@pytest.mark.parametrize("dataset,mean,std", [("mnist", 0.1307, 0.3081),
                                              ("fashion_mnist", 0.2860, 0.3530)])
def test_normalize_maps_the_datasets_mean_to_zero_and_one_std_above_it_to_one(dataset, mean,
                                                                              std):
  levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  np.testing.assert_allclose(input_pipeline.normalize(levels, dataset),
                             (levels / 255.0 - mean) / std, rtol=1e-6, atol=1e-6)
  at = np.array([mean, mean + std]) * 255  # the mean, and one std above it
  np.testing.assert_allclose(input_pipeline.normalize(at, dataset), [0.0, 1.0], atol=1e-6)


FASHION_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.mark.slow
@pytest.mark.skipif(not Path(FASHION_DIR).is_dir(),
                    reason="apt-get install -y dataset-fashion-mnist (.ci/run does)")
def test_fashion_mnist_builds_offline_with_its_known_counts(tmp_path):
  images, labels = mnist_source.load_split("fashion_mnist", "train", str(tmp_path), FASHION_DIR)
  assert images.shape == (60000, 28, 28, 1)
  assert np.bincount(labels).tolist() == [6000] * 10
  spec = mnist_source.dataset_spec("fashion_mnist")
  assert (images / 255.0).mean() == pytest.approx(spec.mean, abs=5e-4)
  assert (images / 255.0).std() == pytest.approx(spec.std, abs=5e-4)
  info = tfds.builder("fashion_mnist", data_dir=str(tmp_path)).info
  assert info.splits["test"].num_examples == 10000


@pytest.mark.slow
def test_interrupted_build_is_not_taken_for_a_finished_one(tmp_path):
  import subprocess
  import sys
  import time

  data_dir = tmp_path / "tfds"
  code = ("from vit_jax import mnist_source; mnist_source.builder('mnist', "
          f"data_dir={str(data_dir)!r}, idx_dir={str(MNIST_IDX_DIR)!r})")
  proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 120
    while not list(data_dir.glob("mnist/incomplete*/*.tfrecord*")):
      assert proc.poll() is None, "the build ended before it could be interrupted"
      assert time.monotonic() < deadline, "the build never started writing"
      time.sleep(0.05)
    proc.kill()  # SIGKILL mid-write: no cleanup code runs
  finally:
    proc.kill()
    proc.wait()
  assert not tfds.builder("mnist", data_dir=str(data_dir)).is_prepared()
  images, labels = mnist_source.load_split("mnist", "test", str(data_dir), str(MNIST_IDX_DIR))
  assert np.bincount(labels).tolist() == TEST_COUNTS
