"""Knowledge distillation: trained runs' class probabilities as another run's targets.

A teacher is a trained run (its workdir); several are averaged, an ensemble (Hinton et al.
2015). `teacher_targets` computes, for every image of the dataset's training split in the
dataset's order, each teacher's class probabilities (averaged over its own test-time views,
as its evaluation averages them), then their mean over the teachers. `save_targets` writes
them with the labels they were computed for; `load_targets` reads them back for a run whose
`config.distill_targets` names the file, and refuses a file of another dataset or order.
`experiments/teacher_targets.py` is the command. Teachers trained on the training split add
no data: the student still learns from those 60,000 images only.

Layer 4 of vit_jax.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from vit_jax import inference
from vit_jax.files import replaced_atomically
from vit_jax.workdir import read_config

SUM_TOLERANCE = 1e-3  # how far a row of probabilities may sum from 1 (float32 rounding)


def teacher_probabilities(workdir: str | os.PathLike, images: np.ndarray,
                          batch_size: int = 500, progress=None, one_view: bool = False
                          ) -> np.ndarray:
  """uint8 (N, H, W, C) images -> float32 (N, K): the latest checkpoint of the run in
  `workdir` (its moving average where it kept one), averaged over its test-time views, or
  with `one_view` of each image itself (a ninth of the work where a run averages 9 shifts).
  `progress(done, total)` is called after each batch."""
  config = inference.resolved_config(read_config(workdir), workdir)
  if one_view:
    config = dataclasses.replace(config, eval_max_shift=0, eval_flip=False)
  state = inference.restore_state(config, workdir)
  predict = jax.jit(functools.partial(inference.probabilities, config, state.apply_fn))
  parts = []
  for start in range(0, len(images), batch_size):
    parts.append(np.asarray(predict(state.params, images[start:start + batch_size]),
                            np.float32))
    if progress is not None:
      progress(start + len(parts[-1]), len(images))
  return np.concatenate(parts)


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


def save_targets(path: str | os.PathLike, probabilities: np.ndarray, labels: np.ndarray,
                 dataset: str, teachers: Sequence[str]) -> None:
  """Writes the targets with the labels and dataset they belong to (whole or not at all)."""
  with replaced_atomically(path) as partial, open(partial, "wb") as f:
    np.savez(f, probabilities=np.asarray(probabilities, np.float32),
             labels=np.asarray(labels, np.int32), dataset=np.asarray(dataset),
             teachers=np.asarray([str(t) for t in teachers]))


def load_targets(path: str | os.PathLike, dataset: str, labels: np.ndarray,
                 num_classes: int) -> np.ndarray:
  """float32 (N, num_classes) teacher probabilities for the N training `labels` of `dataset`,
  in their order; a one-line ValueError naming `config.distill_targets` for any other file."""
  name = f"distill_targets={str(path)!r}"
  if not Path(path).is_file():
    raise ValueError(f"{name} does not exist (experiments/teacher_targets.py writes one)")
  try:
    with np.load(path) as saved:
      probabilities, saved_labels = saved["probabilities"], saved["labels"]
      saved_dataset = str(saved["dataset"])
  except (OSError, ValueError, KeyError) as error:
    raise ValueError(f"{name} is not a file of teacher targets ({error})") from None
  if saved_dataset != dataset:
    raise ValueError(f"{name} holds {saved_dataset}'s targets, not {dataset}'s")
  if saved_labels.shape != labels.shape or np.any(saved_labels != labels):
    raise ValueError(f"{name} was computed for other images: its {len(saved_labels)} labels "
                     f"are not those of {dataset}'s {len(labels)} training images, in order")
  if probabilities.shape != (len(labels), num_classes):
    raise ValueError(f"{name} holds probabilities of shape {probabilities.shape}, not "
                     f"{(len(labels), num_classes)}")
  sums = probabilities.sum(axis=-1)
  if not (np.all(np.isfinite(probabilities)) and np.all(probabilities >= 0)
          and np.all(np.abs(sums - 1) <= SUM_TOLERANCE)):
    raise ValueError(f"{name} holds rows that are not probabilities (negative, not finite or "
                     "not summing to 1)")
  return probabilities.astype(np.float32)
