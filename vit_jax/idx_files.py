"""The four IDX files of MNIST or Fashion-MNIST: read, and checked to be the official ones.

Layer 3 of vit_jax (the input pipeline); numpy only. `mnist_source` builds the TFDS datasets
from them.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from pathlib import Path

import numpy as np

IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049
IMAGE_SIZE = 28


# SHA-256 of each uncompressed IDX file of the official releases, in IDX_FILES' order.
OFFICIAL_SHA256 = {
    "mnist": ("ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
              "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
              "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
              "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    "fashion_mnist": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                      "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                      "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                      "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}


IDX_FILE_NAMES = [name for pair in IDX_FILES.values() for name in pair]
# Which release's file a digest is: to say so when idx_dir is the other dataset's folder.
_KNOWN_DIGESTS = {digest: f"{dataset}'s {file_name}"
                  for dataset, digests in OFFICIAL_SHA256.items()
                  for digest, file_name in zip(digests, IDX_FILE_NAMES, strict=True)}


class DataError(ValueError):
  """A data folder or file that cannot be used; the message names it."""


def read_idx(path: str | os.PathLike, kind: str, num_examples: int,
             sha256: str | None = None) -> np.ndarray:
  """Reads one IDX file (gzipped or not) and checks it thoroughly.

  Args:
    path: the file.
    kind: 'images' (-> uint8 (num_examples, 28, 28)) or 'labels' (-> uint8 (num_examples,)).
    num_examples: how many records the file must hold.
    sha256: if given, the SHA-256 the uncompressed bytes must have.

  Raises:
    DataError naming the file and what is wrong with it.
  """
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: IDX file not found")
  try:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
      raw = gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"{path}: cannot be decompressed ({e}); the file is truncated or "
                    "corrupt") from None
  magic, header_len = (_IMAGES_MAGIC, 16) if kind == "images" else (_LABELS_MAGIC, 8)
  if len(raw) < header_len:
    raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX {kind} header")
  header = np.frombuffer(raw[:header_len], dtype=">u4")
  if header[0] != magic:
    raise DataError(f"{path}: magic number {header[0]} is not {magic} (IDX {kind})")
  if header[1] != num_examples:
    raise DataError(f"{path}: holds {header[1]} records, expected {num_examples}")
  shape = (num_examples, IMAGE_SIZE, IMAGE_SIZE) if kind == "images" else (num_examples,)
  if kind == "images" and tuple(header[2:]) != (IMAGE_SIZE, IMAGE_SIZE):
    raise DataError(f"{path}: images are {header[2]}x{header[3]}, expected 28x28")
  expected_len = header_len + int(np.prod(shape))
  if len(raw) != expected_len:
    raise DataError(f"{path}: {len(raw)} bytes uncompressed, expected {expected_len}; "
                    "the file is truncated or has trailing data")
  if sha256 is not None:
    _check_digest(path, raw, sha256)
  data = np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)
  if kind == "labels" and data.max() > 9:
    raise DataError(f"{path}: label {data.max()} is outside 0-9")
  return data


def _check_digest(path: Path, raw: bytes, sha256: str) -> None:
  digest = hashlib.sha256(raw).hexdigest()
  if digest in _KNOWN_DIGESTS and digest != sha256:
    raise DataError(f"{path}: holds {_KNOWN_DIGESTS[digest]}, not the file expected here; "
                    "idx_dir is another dataset's folder")
  if digest != sha256:
    raise DataError(f"{path}: SHA-256 of the uncompressed data does not match the official "
                    "release; the file is corrupt")
