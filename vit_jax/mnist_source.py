"""Where the digits come from: TFDS's `mnist` / `fashion_mnist`, online or built offline.

With internet, TFDS downloads and prepares the dataset as usual. Without it, the
same TFDS dataset (same name, version, features and splits) is built from a folder
holding the four standard IDX files, once per TFDS data dir, and reused after that.
TFDS writes into a temporary folder and renames it when complete, so an interrupted
build leaves nothing a later run would read as a finished dataset.

Decoding TFDS's records goes through TensorFlow and takes seconds (importing it alone about
four). So the first load of a split also keeps its arrays beside the records, as
`<split>.arrays.npz` in the prepared dataset's folder (written whole, then renamed into
place); later loads read that file and never import TensorFlow.

Layer 3 of vit_jax: knows nothing of models or training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from vit_jax.files import replaced_atomically

# The project's own copy of MNIST, relative to the repository root.
_REPO_ROOT = Path(__file__).resolve().parent.parent
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049
_IMAGE_SIZE = 28


# SHA-256 of each uncompressed IDX file of the official releases, in IDX_FILES' order.
_OFFICIAL_SHA256 = {
    "mnist": ("ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
              "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
              "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
              "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    "fashion_mnist": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                      "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                      "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                      "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}


_IDX_FILE_NAMES = [name for pair in IDX_FILES.values() for name in pair]
# Which release's file a digest is: to say so when idx_dir is the other dataset's folder.
_KNOWN_DIGESTS = {digest: f"{dataset}'s {file_name}"
                  for dataset, digests in _OFFICIAL_SHA256.items()
                  for digest, file_name in zip(digests, _IDX_FILE_NAMES, strict=True)}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What we know about a supported dataset before reading it."""
  tfds_name: str
  # Mean and std of the training images scaled to [0, 1] (checked by a test).
  mean: float
  std: float
  # Folders searched for the IDX files when the config says idx_dir='auto'.
  default_idx_dirs: tuple[str, ...]
  num_examples: dict[str, int] = dataclasses.field(
      default_factory=lambda: {"train": 60000, "test": 10000})

  @property
  def sha256(self) -> dict[str, str]:
    """The official SHA-256 of each uncompressed IDX file, by file name."""
    return dict(zip(_IDX_FILE_NAMES, _OFFICIAL_SHA256[self.tfds_name], strict=True))


DATASETS = {
    "mnist": DatasetSpec("mnist", mean=0.1307, std=0.3081,
                         default_idx_dirs=(str(_REPO_ROOT.parent / "shared/data/mnist"),)),
    "fashion_mnist": DatasetSpec("fashion_mnist", mean=0.2860, std=0.3530,
                                 default_idx_dirs=("/usr/share/datasets/fashion-mnist",)),
}


class DataError(ValueError):
  """A data folder or file that cannot be used; the message names it."""


def check_split(split: str) -> None:
  if split not in IDX_FILES:
    raise DataError(f"split={split!r} is not one of {', '.join(map(repr, IDX_FILES))}")


def dataset_spec(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise DataError(f"dataset={name!r} is not supported (known: {', '.join(DATASETS)})")
  return DATASETS[name]


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
  shape = (num_examples, _IMAGE_SIZE, _IMAGE_SIZE) if kind == "images" else (num_examples,)
  if kind == "images" and tuple(header[2:]) != (_IMAGE_SIZE, _IMAGE_SIZE):
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


def read_idx_split(name: str, idx_dir: str | os.PathLike,
                   split: str) -> tuple[np.ndarray, np.ndarray]:
  """-> images uint8 (N, 28, 28, 1), labels uint8 (N,) of one split, from IDX files."""
  spec = dataset_spec(name)
  check_split(split)
  check_idx_dir(idx_dir)
  images_file, labels_file = IDX_FILES[split]
  n = spec.num_examples[split]
  images = read_idx(_idx_file(idx_dir, images_file), "images", n, spec.sha256[images_file])
  labels = read_idx(_idx_file(idx_dir, labels_file), "labels", n, spec.sha256[labels_file])
  return images[..., None], labels


def check_idx_dir(idx_dir: str | os.PathLike) -> None:
  """Refuses an idx_dir that is not an existing folder ('' would read as the current one)."""
  if not str(idx_dir).strip() or not Path(idx_dir).is_dir():
    raise DataError(f"idx_dir={str(idx_dir)!r} is not a folder")


def _idx_file(idx_dir: str | os.PathLike, gz_name: str) -> Path:
  """The file as released (gzipped), or else unzipped under the name without `.gz`."""
  gzipped = Path(idx_dir) / gz_name
  unzipped = gzipped.with_suffix("")
  return unzipped if not gzipped.exists() and unzipped.is_file() else gzipped


def _offline_builder_class(name: str):
  """A TFDS builder named like TFDS's own that reads local IDX files instead of downloading."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.image_classification import mnist as tfds_mnist

  base = {"mnist": tfds_mnist.MNIST, "fashion_mnist": tfds_mnist.FashionMNIST}[name]

  class OfflineBuilder(base, skip_registration=True):
    __doc__ = f"TFDS `{name}` built from local IDX files."

    def __init__(self, *, splits: dict[str, tuple[np.ndarray, np.ndarray]], **kwargs):
      self._splits = splits  # already read and checked by read_idx_split
      super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing to download
      return [tfds.core.SplitGenerator(name=split, gen_kwargs={"split": split})
              for split in (tfds.Split.TRAIN, tfds.Split.TEST)]

    def _generate_examples(self, split):
      images, labels = self._splits[str(split)]
      for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        yield index, {"image": image, "label": int(label)}

  OfflineBuilder.name = base.name
  # TFDS locates a builder's checksums file from its module: use TFDS's own.
  OfflineBuilder.__module__ = base.__module__
  return OfflineBuilder


def resolve_idx_dir(name: str, idx_dir: str | None) -> str | None:
  """'auto' -> the first default folder that exists (or None: download); else as given."""
  if idx_dir != "auto":
    return idx_dir
  for folder in dataset_spec(name).default_idx_dirs:
    if Path(folder).is_dir():
      return folder
  return None


def builder(name: str, data_dir: str | None = None, idx_dir: str | None = "auto"):
  """The TFDS builder of `name`, prepared: from `data_dir` if it holds it, else built.

  Args:
    name: 'mnist' or 'fashion_mnist'.
    data_dir: the TFDS data dir (None: TFDS's default, ~/tensorflow_datasets).
    idx_dir: a folder with the four IDX files to build from offline; 'auto' picks
      the known folder for `name` if it exists; None (or no folder found)
      downloads through TFDS.
  """
  import tensorflow_datasets as tfds

  spec = dataset_spec(name)
  if idx_dir not in (None, "auto"):
    check_idx_dir(idx_dir)  # even where the dataset is built already: a misspelt folder
  if data_dir is not None and "://" not in str(data_dir):  # TFDS reads gs:// itself
    try:  # before TFDS builds there and fails naming no setting; "" is the current folder
      if not str(data_dir).strip():
        raise OSError("it names none")
      Path(data_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise DataError(f"tfds_data_dir={str(data_dir)!r} is not a folder and cannot be created: "
                      f"{e.strerror or e}") from None
  prepared = tfds.builder(spec.tfds_name, data_dir=data_dir)
  if prepared.is_prepared():
    return prepared
  folder = resolve_idx_dir(name, idx_dir)
  if folder is None:
    prepared.download_and_prepare()
    return prepared
  # Read and check everything before TFDS creates anything.
  splits = {split: read_idx_split(name, folder, split) for split in IDX_FILES}
  offline = _offline_builder_class(name)(splits=splits, data_dir=data_dir)
  offline.download_and_prepare()
  return tfds.builder(spec.tfds_name, data_dir=data_dir)


def load_split(name: str, split: str, data_dir: str | None = None,
               idx_dir: str | None = "auto") -> tuple[np.ndarray, np.ndarray]:
  """One split, whole, as arrays: images uint8 (N, 28, 28, 1), labels int32 (N,)."""
  import tensorflow_datasets as tfds

  check_split(split)  # before the dataset is prepared, which may take minutes
  prepared = builder(name, data_dir, idx_dir)
  num_examples = dataset_spec(name).num_examples[split]
  cache = Path(os.fspath(prepared.data_dir)) / f"{split}.arrays.npz"
  cached = _read_array_cache(cache, num_examples)
  if cached is not None:
    return cached
  ds = prepared.as_dataset(split=split, batch_size=-1, shuffle_files=False)
  arrays = tfds.as_numpy(ds)
  images, labels = arrays["image"].astype(np.uint8), arrays["label"].astype(np.int32)
  _write_array_cache(cache, images, labels)
  return images, labels


def _read_array_cache(path: Path, num_examples: int) -> tuple[np.ndarray, np.ndarray] | None:
  """The cached (images, labels) of a split, or None if the file is missing or not whole."""
  try:
    with np.load(path) as arrays:
      images, labels = arrays["images"], arrays["labels"]
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    return None
  if (images.shape != (num_examples, _IMAGE_SIZE, _IMAGE_SIZE, 1) or images.dtype != np.uint8
      or labels.shape != (num_examples,) or labels.dtype != np.int32):
    return None
  return images, labels


def _write_array_cache(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
  """Writes the cache whole (`files.replaced_atomically`); a folder we cannot write to (a
  read-only or remote data dir) just goes without."""
  with contextlib.suppress(OSError), replaced_atomically(path) as partial, \
      open(partial, "wb") as f:
    np.savez(f, images=images, labels=labels)
