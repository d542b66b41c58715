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
  with Image.open(tmp_path / "deep.png") as saved:
    assert saved.mode.startswith("I;16")
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


@pytest.mark.parametrize("array,message", [
    (np.full((28, 28), 1.0000001), r"values 1.0000001..1.0000001 outside \[0, 1\]"),
    (np.full((28, 28), 200.0), r"outside \[0, 1\] \(floats are grey levels"),
    (np.full((28, 28), 300, np.int32), "values 300..300 outside 0-255"),
    (np.zeros((28, 28), np.complex64), "dtype complex64 is not real integers or floats"),
])
def test_npy_levels_out_of_range_or_complex_are_refused_not_rescaled(tmp_path, array, message):
  np.save(tmp_path / "a.npy", array)
  with pytest.raises(image_files.ImageFileError, match=message):
    image_files.load_image(tmp_path / "a.npy")


def test_an_npz_archive_named_npy_is_refused(tmp_path):
  with open(tmp_path / "a.npy", "wb") as f:
    np.savez(f, image=np.zeros((28, 28), np.uint8))
  with pytest.raises(image_files.ImageFileError, match=r"a.npy: an .npz archive"):
    image_files.load_image(tmp_path / "a.npy")


def test_transparency_is_refused_and_an_opaque_alpha_channel_is_read(tmp_path):
  from PIL import Image

  strokes = np.zeros((28, 28, 4), np.uint8)  # black strokes on a transparent background
  strokes[10:18, 12:16, 3] = 255
  Image.fromarray(strokes, "RGBA").save(tmp_path / "drawn.png")
  with pytest.raises(image_files.ImageFileError, match=r"drawn.png: transparent .*\(752 pix"):
    image_files.load_image(tmp_path / "drawn.png")
  opaque = np.zeros((28, 28, 4), np.uint8)
  opaque[..., 3] = 255
  opaque[10:18, 12:16, :3] = 255  # a white bar on black, alpha 255 everywhere
  Image.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")
  np.testing.assert_array_equal(image_files.load_image(tmp_path / "opaque.png")[..., 0],
                                opaque[..., 0])
