"""Reading a user's digit images (PNG or .npy) into the model's input format.

Layer 3 of vit_jax: knows nothing of models or training.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class ImageFileError(ValueError):
  """An image file that cannot be used; the message names the file and why."""


def load_image(path: str | os.PathLike, size: int = 28) -> np.ndarray:
  """-> uint8 (size, size, 1): a grey image, white digit on black as in MNIST.

  PNG (or any format Pillow reads) in any mode is converted to grey, refused where it is
  transparent (what shows through is not in the file); .npy holds an (H, W) or (H, W, 1) array
  of grey levels: integers in 0-255 or floats in [0, 1]. Either must already be size x size:
  resizing would change what the model sees.
  """
  path = Path(path)
  if not path.is_file():
    raise ImageFileError(f"{path}: no such file")
  if path.suffix.lower() == ".npy":
    array = _npy_grey_levels(path)
  else:
    from PIL import Image, UnidentifiedImageError

    try:
      with Image.open(path) as image:
        array = _grey_levels(image, path)
    except (UnidentifiedImageError, OSError) as e:
      raise ImageFileError(f"{path}: not an image Pillow can read ({e})") from None
  if array.shape != (size, size):
    raise ImageFileError(f"{path}: shape {array.shape} is not {size}x{size} grey")
  return array[..., None]


def _npy_grey_levels(path: Path) -> np.ndarray:
  """An .npy file's (H, W) uint8 grey levels; floats are read as [0, 1] (a float above 1 is
  refused, not guessed to be on 0-255), integers as 0-255."""
  try:
    array = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise ImageFileError(f"{path}: not a readable .npy array ({e})") from None
  if not isinstance(array, np.ndarray):  # an .npz archive under an .npy name
    raise ImageFileError(f"{path}: an .npz archive, not one .npy array")
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  floats = np.issubdtype(array.dtype, np.floating)
  if not (floats or np.issubdtype(array.dtype, np.integer)):
    raise ImageFileError(f"{path}: dtype {array.dtype} is not real integers or floats")
  if not np.all(np.isfinite(array)):
    raise ImageFileError(f"{path}: values not finite")
  allowed = "[0, 1] (floats are grey levels from 0 to 1)" if floats else "0-255"
  if array.size and (array.min() < 0 or array.max() > (1.0 if floats else 255)):
    raise ImageFileError(f"{path}: values {array.min()}..{array.max()} outside {allowed}")
  if array.dtype == np.uint8:
    return array
  return np.round(array * (255.0 if floats else 1.0)).astype(np.uint8)


def _grey_levels(image, path: Path) -> np.ndarray:
  """A Pillow image as (H, W) uint8 grey levels; 16-bit grey scaled down, not clipped (as
  Pillow's own conversion does: most of a 16-bit image would turn white)."""
  if image.mode.startswith("I;16"):
    return np.round(np.asarray(image, np.float64) / 257.0).astype(np.uint8)
  if image.mode in ("I", "F"):
    raise ImageFileError(f"{path}: mode {image.mode} (32-bit grey) is not read; save it as "
                         "8- or 16-bit grey")
  if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
    alpha = np.asarray(image.convert("RGBA"))[..., 3]
    if np.any(alpha < 255):
      raise ImageFileError(f"{path}: transparent where alpha < 255 ({np.sum(alpha < 255)} "
                           "pixels); save it without transparency, a white digit on black")
  return np.asarray(image.convert("L"))
