"""The IDX files a dataset is built from: what is read, and what is refused with its name."""

import gzip
import shutil

import pytest
from conftest import MNIST_IDX_DIR

from vit_jax import mnist_source
from vit_jax.mnist_source import DataError


def copy_idx(tmp_path):
  folder = tmp_path / "idx"
  shutil.copytree(MNIST_IDX_DIR, folder)
  for f in folder.iterdir():
    f.chmod(0o644)
  return folder


@pytest.mark.slow
def test_missing_file_is_named(tmp_path):
  folder = copy_idx(tmp_path)
  (folder / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: IDX file not found"):
    mnist_source.builder("mnist", data_dir=str(tmp_path / "tfds"), idx_dir=str(folder))
  assert not (tmp_path / "tfds" / "mnist").exists()  # nothing half-written


@pytest.mark.slow
def test_truncated_gzip_is_named(tmp_path):
  folder = copy_idx(tmp_path)
  path = folder / "train-images-idx3-ubyte.gz"
  path.write_bytes(path.read_bytes()[:100_000])
  with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: cannot be decompressed"):
    mnist_source.read_idx_split("mnist", folder, "train")


@pytest.mark.slow
def test_truncated_content_is_named(tmp_path):
  folder = copy_idx(tmp_path)
  path = folder / "t10k-images-idx3-ubyte.gz"
  raw = gzip.decompress(path.read_bytes())
  path.write_bytes(gzip.compress(raw[:-784]))
  with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: .* bytes uncompressed"):
    mnist_source.read_idx_split("mnist", folder, "test")


@pytest.mark.slow
def test_corrupt_content_is_named(tmp_path):
  folder = copy_idx(tmp_path)
  path = folder / "t10k-labels-idx1-ubyte.gz"
  raw = bytearray(gzip.decompress(path.read_bytes()))
  raw[100] = (raw[100] + 1) % 10
  path.write_bytes(gzip.compress(bytes(raw)))
  with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: SHA-256"):
    mnist_source.read_idx_split("mnist", folder, "test")


@pytest.mark.slow
def test_wrong_kind_of_file_is_named(tmp_path):
  folder = copy_idx(tmp_path)
  shutil.copy(folder / "t10k-labels-idx1-ubyte.gz", folder / "t10k-images-idx3-ubyte.gz")
  with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: magic number 2049"):
    mnist_source.read_idx_split("mnist", folder, "test")


def test_wrong_folder_is_named(tmp_path, tfds_dir):
  with pytest.raises(DataError, match="idx_dir=.*nowhere.* is not a folder"):
    mnist_source.read_idx_split("mnist", tmp_path / "nowhere", "train")
  # Also where the dataset is built already and the folder would not be read.
  with pytest.raises(DataError, match="idx_dir=.*nowhere.* is not a folder"):
    mnist_source.load_split("mnist", "test", tfds_dir, str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_unzipped_idx_files_are_read_as_the_gzipped_ones(tmp_path):
  folder = tmp_path / "unzipped"
  folder.mkdir()
  for name in mnist_source.IDX_FILES["test"]:
    (folder / name.removesuffix(".gz")).write_bytes(
        gzip.decompress((MNIST_IDX_DIR / name).read_bytes()))
  for got, want in zip(mnist_source.read_idx_split("mnist", folder, "test"),
                       mnist_source.read_idx_split("mnist", MNIST_IDX_DIR, "test"), strict=True):
    assert (got == want).all()


@pytest.mark.slow
def test_another_datasets_folder_is_named_as_such():
  with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: holds mnist's "
                     r"t10k-images-idx3-ubyte.gz, not .* idx_dir is another dataset's folder$"):
    mnist_source.read_idx_split("fashion_mnist", MNIST_IDX_DIR, "test")


@pytest.mark.parametrize("idx_dir", ["", "  "])
def test_an_empty_idx_dir_is_refused_not_read_as_the_current_folder(idx_dir, tmp_path):
  with pytest.raises(DataError, match=f"idx_dir={idx_dir!r} is not a folder"):
    mnist_source.read_idx_split("mnist", idx_dir, "test")
  with pytest.raises(DataError, match=f"idx_dir={idx_dir!r} is not a folder"):
    mnist_source.builder("mnist", data_dir=str(tmp_path), idx_dir=idx_dir)


def test_a_tfds_data_dir_that_cannot_be_a_folder_is_named_before_tfds_starts(tmp_path):
  (tmp_path / "file").write_text("")
  for data_dir, why in [(tmp_path / "file", "File exists"),
                        (tmp_path / "file" / "tfds", "Not a directory"), ("", "it names none")]:
    with pytest.raises(DataError, match=f"^tfds_data_dir='{data_dir}' is not a folder and "
                                        f"cannot be created: {why}$"):
      mnist_source.builder("mnist", data_dir=str(data_dir), idx_dir=str(tmp_path))
  with pytest.raises(DataError, match="IDX file not found"):  # a missing folder is made
    mnist_source.builder("mnist", data_dir=str(tmp_path / "new" / "tfds"), idx_dir=str(tmp_path))
  assert (tmp_path / "new" / "tfds").is_dir()


@pytest.mark.slow
def test_a_build_from_idx_files_says_what_it_does_in_two_lines(tmp_path, capfd, caplog):
  data_dir = tmp_path / "tfds"
  mnist_source.builder("mnist", data_dir=str(data_dir), idx_dir=str(MNIST_IDX_DIR))
  out, err = capfd.readouterr()  # err: TensorFlow's own lines on its import, if any
  built = data_dir / "mnist" / "3.0.1"
  assert out.splitlines() == [
      f"building TFDS mnist from the IDX files in {MNIST_IDX_DIR} into {built}, once (seconds)",
      f"built {built}"]
  for tfds_line in ("Variant folder", "Downloading and preparing", "Generating", "Shuffling",
                    "downloaded and prepared"):
    assert tfds_line not in out + err + caplog.text
  mnist_source.builder("mnist", data_dir=str(data_dir), idx_dir=str(MNIST_IDX_DIR))
  assert capfd.readouterr() == ("", "")  # built: nothing to say
