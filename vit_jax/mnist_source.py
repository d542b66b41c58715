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
import io
import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from vit_jax.files import replaced_atomically
from vit_jax.idx_files import (
    IDX_FILE_NAMES,
    IDX_FILES,
    IMAGE_SIZE,
    OFFICIAL_SHA256,
    DataError,
    read_idx,
)

# The project's own copy of MNIST, relative to the repository root.
_REPO_ROOT = Path(__file__).resolve().parent.parent


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
    return dict(zip(IDX_FILE_NAMES, OFFICIAL_SHA256[self.tfds_name], strict=True))


DATASETS = {
    "mnist": DatasetSpec("mnist", mean=0.1307, std=0.3081,
                         default_idx_dirs=(str(_REPO_ROOT.parent / "shared/data/mnist"),)),
    "fashion_mnist": DatasetSpec("fashion_mnist", mean=0.2860, std=0.3530,
                                 default_idx_dirs=("/usr/share/datasets/fashion-mnist",)),
}


def check_split(split: str) -> None:
  if split not in IDX_FILES:
    raise DataError(f"split={split!r} is not one of {', '.join(map(repr, IDX_FILES))}")


def dataset_spec(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise DataError(f"dataset={name!r} is not supported (known: {', '.join(DATASETS)})")
  return DATASETS[name]


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
  with _tfds_quiet():  # "Variant folder ... has no dataset_info.json": not built yet
    if prepared.is_prepared():
      return prepared
  folder = resolve_idx_dir(name, idx_dir)
  if folder is None:
    prepared.download_and_prepare()  # TFDS's own progress bars: downloads take a while
    return prepared
  # Read and check everything before TFDS creates anything.
  splits = {split: read_idx_split(name, folder, split) for split in IDX_FILES}
  offline = _offline_builder_class(name)(splits=splits, data_dir=data_dir)
  print(f"building TFDS {spec.tfds_name} from the IDX files in {folder} into "
        f"{offline.data_dir}, once (seconds)", flush=True)
  with _tfds_quiet():  # its lines for a download, and a bar per split and shuffle (seconds)
    offline.download_and_prepare()
  print(f"built {offline.data_dir}", flush=True)
  return tfds.builder(spec.tfds_name, data_dir=data_dir)


@contextlib.contextmanager
def _tfds_quiet():
  """TFDS's prints, progress bars and absl warnings off for the block."""
  import tensorflow_datasets as tfds

  absl_logger, level = logging.getLogger("absl"), logging.getLogger("absl").level
  bars = getattr(tfds.core.utils.tqdm_utils, "_active", True)  # as the user left them
  absl_logger.setLevel(logging.ERROR)
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.display_progress_bar(bars)
    absl_logger.setLevel(level)


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
  if (images.shape != (num_examples, IMAGE_SIZE, IMAGE_SIZE, 1) or images.dtype != np.uint8
      or labels.shape != (num_examples,) or labels.dtype != np.int32):
    return None
  return images, labels


def _write_array_cache(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
  """Writes the cache whole (`files.replaced_atomically`); a folder we cannot write to (a
  read-only or remote data dir) just goes without."""
  with contextlib.suppress(OSError), replaced_atomically(path) as partial, \
      open(partial, "wb") as f:
    np.savez(f, images=images, labels=labels)
