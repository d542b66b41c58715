"""A user's digit images (PNG or .npy) read for `--mode=predict`: what is read, what is refused."""

import numpy as np
import pytest

from vit_jax import image_files


def test_load_image_png_and_npy(tmp_path):
  from PIL import Image

  digit = np.random.default_rng(0).integers(0, 255, (28, 28)).astype(np.uint8)
  Image.fromarray(digit).convert("RGB").save(tmp_path / "d.png")
  np.save(tmp_path / "d.npy", digit)
  np.save(tmp_path / "f.npy", digit[..., None] / 255.0)
  for name in ("d.png", "d.npy", "f.npy"):
    np.testing.assert_array_equal(image_files.load_image(tmp_path / name)[..., 0], digit)


@pytest.mark.parametrize("name,content,message", [
    ("text.png", b"not an image", "not an image Pillow can read"),
    ("bad.npy", b"junk", "not a readable .npy array"),
    ("missing.png", None, "no such file"),
])
def test_load_image_errors(tmp_path, name, content, message):
  if content is not None:
    (tmp_path / name).write_bytes(content)
  with pytest.raises(image_files.ImageFileError, match=message):
    image_files.load_image(tmp_path / name)


def test_a_16_bit_grey_png_is_scaled_to_8_bits_not_clipped(tmp_path):
  from PIL import Image

  levels = np.arange(28 * 28, dtype=np.float64).reshape(28, 28) / (28 * 28 - 1)
  Image.fromarray(np.round(levels * 65535).astype(np.uint16)).save(tmp_path / "deep.png")
  assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
  loaded = image_files.load_image(tmp_path / "deep.png")[..., 0]
  np.testing.assert_allclose(loaded, levels * 255, atol=1)
  Image.fromarray(levels.astype(np.float32)).save(tmp_path / "float.tiff")  # mode F
  with pytest.raises(image_files.ImageFileError, match=r"float.tiff: mode F \(32-bit grey\)"):
    image_files.load_image(tmp_path / "float.tiff")


def test_an_npy_of_nan_is_refused_not_read_as_black(tmp_path):
  np.save(tmp_path / "nan.npy", np.full((28, 28), np.nan, np.float32))
  with pytest.raises(image_files.ImageFileError, match=r"nan.npy: values not finite$"):
    image_files.load_image(tmp_path / "nan.npy")


def test_load_image_wrong_shape(tmp_path):
  np.save(tmp_path / "big.npy", np.zeros((32, 32), np.uint8))
  with pytest.raises(image_files.ImageFileError, match=r"shape \(32, 32\) is not 28x28"):
    image_files.load_image(tmp_path / "big.npy")
