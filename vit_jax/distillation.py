"""Knowledge distillation: trained runs' class probabilities as another run's targets.

A teacher is a trained run (its workdir); several are averaged, an ensemble (Hinton et al.
2015). `teacher_targets` computes, for every image of the dataset's training split in the
dataset's order, each teacher's class probabilities (averaged over its own test-time views,
as its evaluation averages them), then their mean over the teachers. `save_targets` writes
them with the labels and images' digest they were computed for and the teachers' held-out
count; `load_targets` reads them back for a run whose `config.distill_targets` names the file,
and refuses a file of another dataset or order, or teachers that saw its validation images.
`experiments/teacher_targets.py` is the command. Teachers trained on the training split add
no data: the student still learns from those 60,000 images only.

Layer 4 of vit_jax.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vit_jax import inference
from vit_jax.files import replaced_atomically
from vit_jax.workdir import read_config

SUM_TOLERANCE = 1e-3  # how far a row of probabilities may sum from 1 (float32 rounding)


def images_digest(images: np.ndarray) -> str:
  """sha256 of uint8 (N, H, W, C) images' bytes: which images, in which order."""
  return hashlib.sha256(np.ascontiguousarray(images, np.uint8).tobytes()).hexdigest()


def teacher_probabilities(workdir: str | os.PathLike, images: np.ndarray,
                          batch_size: int = 500, progress=None, one_view: bool = False
                          ) -> np.ndarray:
  """uint8 (N, H, W, C) images -> float32 (N, K): the latest checkpoint of the run in
  `workdir` (its moving average where it kept one), averaged over its test-time views, or
  with `one_view` of each image itself (a ninth of the work where a run averages 9 shifts);
  batches of `batch_size` over this process's devices, as evaluation runs them
  (`inference.probabilities_in_batches`). `progress(done, total)` is called after each batch."""
  config = inference.resolved_config(read_config(workdir), workdir)
  state = inference.restore_state(config, workdir, one_view=one_view)
  if one_view:
    config = dataclasses.replace(config, eval_max_shift=0, eval_flip=False)
  return inference.probabilities_in_batches(config, state, images, batch_size, progress)


def teacher_targets(workdirs: Sequence[str | os.PathLike], images: np.ndarray,
                    batch_size: int = 500, progress=None, one_view: bool = False
                    ) -> np.ndarray:
  """The mean of `teacher_probabilities` over the runs in `workdirs`, float32 (N, K).
  `progress(teacher, done, total)`, teacher counted from 0."""
  if not workdirs:
    raise ValueError("teachers=[] names no trained run")
  total = None
  for i, workdir in enumerate(workdirs):
    report = None if progress is None else functools.partial(progress, i)
    probabilities = teacher_probabilities(workdir, images, batch_size, report, one_view)
    total = probabilities if total is None else total + probabilities
  return (total / len(workdirs)).astype(np.float32)


def save_targets(path: str | os.PathLike, probabilities: np.ndarray, images: np.ndarray,
                 labels: np.ndarray, dataset: str, teachers: Sequence[str],
                 held_out: int) -> None:
  """Writes float (N, K) `probabilities` of uint8 (N, H, W, C) `images` with int (N,)
  `labels` (whole or not at all), and what a run checks them against: the dataset, the
  images' digest, and `held_out`, the fewest training images any teacher held out (its
  `validation_examples`: the first that many of `input_pipeline.hold_out`'s fixed choice)."""
  with replaced_atomically(path) as partial, open(partial, "wb") as f:
    np.savez(f, probabilities=np.asarray(probabilities, np.float32),
             labels=np.asarray(labels, np.int32), dataset=np.asarray(dataset),
             images_sha256=np.asarray(images_digest(images)), held_out=np.asarray(held_out),
             teachers=np.asarray([str(t) for t in teachers]))


def load_targets(path: str | os.PathLike, dataset: str, images: np.ndarray, labels: np.ndarray,
                 num_classes: int, validation_examples: int) -> np.ndarray:
  """float32 (N, num_classes) teacher probabilities for `dataset`'s N training images
  (uint8 (N, H, W, C)) and int (N,) `labels`, in their order; a one-line ValueError naming
  `config.distill_targets` for any other file, or for teachers that trained on some of the
  `validation_examples` a run holds out."""
  name = f"config.distill_targets={str(path)!r}"
  if not Path(path).is_file():
    raise ValueError(f"{name} does not exist (experiments/teacher_targets.py writes one)")
  try:
    with np.load(path) as saved:
      probabilities, saved_labels = saved["probabilities"], saved["labels"]
      saved_dataset, digest = str(saved["dataset"]), str(saved["images_sha256"])
      held_out = int(saved["held_out"])
  except (OSError, ValueError, KeyError) as error:
    raise ValueError(f"{name} is not a file of teacher targets ({error})") from None
  if saved_dataset != dataset:
    raise ValueError(f"{name} holds {saved_dataset}'s targets, not {dataset}'s")
  if (saved_labels.shape != labels.shape or np.any(saved_labels != labels)
      or digest != images_digest(images)):
    raise ValueError(f"{name} was computed for other images: its {len(saved_labels)} are not "
                     f"{dataset}'s {len(labels)} training images, in order")
  if validation_examples > held_out:
    raise ValueError(f"{name} comes from teachers that held out {held_out} training images: "
                     f"they trained on some of the {validation_examples} this run holds out "
                     "(config.validation_examples)")
  check_probabilities(name, probabilities, (len(labels), num_classes))
  return probabilities.astype(np.float32)


def check_probabilities(name: str, probabilities: Any, shape: tuple[int, int]) -> None:
  """A one-line ValueError unless `probabilities` are (N, K) = `shape` rows summing to 1."""
  if probabilities is None or probabilities.shape != shape:
    found = "none" if probabilities is None else f"shape {probabilities.shape}"
    raise ValueError(f"{name} holds probabilities of {found}, not of shape {shape}")
  probabilities = np.asarray(probabilities)
  sums = probabilities.sum(axis=-1)
  if not (np.all(np.isfinite(probabilities)) and np.all(probabilities >= 0)
          and np.all(np.abs(sums - 1) <= SUM_TOLERANCE)):
    raise ValueError(f"{name} holds rows that are not probabilities (negative, not finite or "
                     "not summing to 1)")


def check_teacher(config: Any, train_split: dict[str, Any]) -> None:
  """For data handed to a run: where `config` distils, the training split must carry the
  teacher's (N, K) probabilities, row i for example i ('teacher', as `load_data` adds it)."""
  if config.distill_weight:
    shape = (len(train_split["label"]), config.model.num_classes)
    check_probabilities(f"config.distill_weight={config.distill_weight}: data['train']"
                        "['teacher']", train_split.get("teacher"), shape)
