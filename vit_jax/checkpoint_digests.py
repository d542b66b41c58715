"""What a checkpoint held when it was saved: each array's SHA-256, shape and dtype.

Orbax checks a checkpoint's structure when it restores it, not its bytes: a flipped bit in
an array's data comes back as a wrong number, without a word. So before each checkpoint is
written, its digests go to `checkpoint_digests/<step>.json` beside `checkpoints/` (whole or
not at all), and a restored state is checked against them.

Layer 4 of vit_jax.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from vit_jax.files import write_text_atomically

FOLDER = "checkpoint_digests"
Digests = dict[str, dict[str, Any]]  # array path -> {'sha256', 'shape', 'dtype'}


def _shape_and_dtype(leaf: Any) -> dict[str, Any]:
  # Integers by kind only: the step is saved as a device's int32 and may restore as another.
  shape, dtype = (leaf.shape, np.dtype(leaf.dtype)) if hasattr(leaf, "dtype") else (
      np.shape(leaf), np.asarray(leaf).dtype)
  return {"shape": list(shape), "dtype": "integer" if dtype.kind in "iu" else str(dtype)}


def shapes_of(tree: Any) -> Digests:
  """{path: {'shape', 'dtype'}} of every array of `tree` (arrays or ShapeDtypeStructs)."""
  return {jax.tree_util.keystr(path): _shape_and_dtype(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def digests_of(tree: Any) -> Digests:
  """{path: {'sha256', 'shape', 'dtype'}} of every array of `tree`, from its values."""
  digests = shapes_of(tree)
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = np.asarray(jax.device_get(leaf))
    if array.dtype.kind in "iu":
      array = array.astype(np.int64)
    digests[jax.tree_util.keystr(path)]["sha256"] = hashlib.sha256(
        np.ascontiguousarray(array).tobytes()).hexdigest()
  return digests


def first_difference(recorded: Digests, actual: Digests, keys=("sha256", "shape", "dtype")
                     ) -> str | None:
  """The first array path where `recorded` and `actual` differ in `keys`: the parameters'
  first, then the optimizer's, each in sorted order."""
  for path in sorted(recorded.keys() | actual.keys(),
                     key=lambda p: (not p.startswith(".params"), p)):
    mine, theirs = recorded.get(path, {}), actual.get(path, {})
    if any(mine.get(k) != theirs.get(k) for k in keys):
      return path
  return None


def _sha256_of(arrays: Digests) -> str:
  return hashlib.sha256(json.dumps(arrays, sort_keys=True).encode()).hexdigest()


class DigestFiles:
  """The digests of a workdir's checkpoints, one JSON file a step."""

  def __init__(self, workdir: Path):
    self.folder = Path(workdir) / FOLDER

  def path(self, step: int) -> Path:
    return self.folder / f"{step}.json"

  def write(self, step: int, tree: Any) -> None:
    self.folder.mkdir(exist_ok=True)
    arrays = digests_of(tree)
    record = {"arrays": arrays, "sha256": _sha256_of(arrays)}  # the file checks itself too
    write_text_atomically(self.path(step), json.dumps(record) + "\n")

  def read(self, step: int) -> Digests | None:
    """The digests recorded for `step`; None for a checkpoint saved before they were.

    Raises ValueError if the file is damaged: then nothing about the checkpoint is known.
    """
    try:
      text = self.path(step).read_bytes()
    except FileNotFoundError:
      return None
    try:
      record = json.loads(text)
      arrays = record["arrays"]
      intact = record["sha256"] == _sha256_of(arrays)
    except (ValueError, KeyError, TypeError):
      intact = False
    if not intact:
      raise ValueError(f"its digests file {self.path(step).name} is damaged")
    return arrays

  def move(self, step: int, folder: Path) -> None:
    """Moves the digests of `step` into `folder`, beside the checkpoint moved there."""
    if self.path(step).is_file():
      shutil.move(str(self.path(step)), folder / "digests.json")

  def keep_only(self, steps: list[int]) -> None:
    """Deletes the digests of checkpoints that are gone (orbax keeps the newest few)."""
    for path in self.folder.glob("*.json"):
      if path.stem.isdigit() and int(path.stem) not in steps:
        path.unlink(missing_ok=True)
