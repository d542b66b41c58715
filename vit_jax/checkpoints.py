"""A run's workdir: orbax checkpoints of the train state, and the config beside them.

Orbax writes each checkpoint into a temporary folder and renames it when complete,
and deletes an old checkpoint only after a newer one is complete; a checkpoint
that cannot be read is reported and the next older one is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from vit_jax.checkpoint_digests import (
    DigestFiles,
    Digests,
    digests_of,
    first_difference,
    shapes_of,
)
from vit_jax.files import write_text_atomically
from vit_jax.run_log import LOG_FILE, absl_quiet

log = logging.getLogger("vit_jax")
CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"  # each config.json a resume with other settings replaced


# Folders that hold mount points: a missing folder directly inside one is most likely a
# filesystem that is not mounted, and creating it would write the run to the wrong disk.
_MOUNT_PARENTS = ("/", "/mnt", "/media", "/Volumes")


def prepare_workdir(workdir: str | os.PathLike) -> Path:
  """Creates `workdir` if needed; a clear error if it is a file, unwritable or unmounted."""
  path = Path(workdir).absolute()
  if path.exists() and not path.is_dir():
    raise ValueError(f"workdir={str(workdir)!r} is a file, not a folder")
  missing = [p for p in (path, *path.parents) if not p.exists()]
  if missing and Path(workdir).is_absolute() and str(missing[-1].parent) in _MOUNT_PARENTS:
    raise ValueError(f"workdir={str(workdir)!r}: {missing[-1]} does not exist (a filesystem "
                     "that is not mounted?); create it first if it should")
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"workdir={str(workdir)!r} cannot be created: {e.strerror}") from None
  if not os.access(path, os.W_OK):
    raise ValueError(f"workdir={str(workdir)!r} is not writable")
  return path


# Model fields that change how the maths is computed, not the parameters (float32 whatever
# the products' precision): a run may resume with another value (e.g. on a machine where
# 'auto' chose another kernel, or one that cannot compute in bfloat16).
_COMPUTATION_ONLY = ("attention_kernel", "compute_dtype")


def write_or_check_config(workdir: Path, config: Any, write: bool = True,
                          training: bool = True) -> list[str]:
  """Saves the resolved config in `workdir` (if `write`), or refuses one that changes the model
  or the dataset.

  A workdir's checkpoints only fit the model they were trained with, so resuming or evaluating
  with a different `model` section is an error (its products' precision and attention path
  aside), or with `ema_decay` switched on or off; so is another dataset, whose test split and
  normalisation would be taken without a word (`init_from` fine-tunes on another in a new
  workdir). `training`: resuming also refuses another `seed` (the data order and every draw)
  and more held-out images than the run held out. Other changes are allowed, with a warning,
  and the config.json they replace is appended to config_history.jsonl: nothing of how the
  checkpoints were trained is lost. Returns the fields that differ from the saved run's.
  """
  others = []
  resolved = dataclasses.asdict(config)
  path = workdir / CONFIG_FILE
  if path.exists():
    saved = with_defaults(json.loads(path.read_text()), config)  # newer fields: defaults
    _refuse_another_run(workdir, saved, resolved, training)
    changed = sorted(k for k in set(saved["model"]) | set(resolved["model"])
                     if saved["model"].get(k) != resolved["model"].get(k))
    structural = [k for k in changed if k not in _COMPUTATION_ONLY]
    if structural:
      diffs = ", ".join(f"model.{k}: {saved['model'].get(k)!r} -> {resolved['model'].get(k)!r}"
                        for k in structural)
      raise ValueError(f"workdir={str(workdir)!r} holds a run of a different model ({diffs}); "
                       f"{'use a new workdir' if training else 'pass the config it ran with'}")
    others = [f"model.{k}" for k in changed] + sorted(
        k for k in resolved if k != "model" and saved.get(k) != resolved[k])
    if others and write:
      log.warning("resuming %s with changed settings: %s (the old ones appended to %s)",
                  workdir, ", ".join(others), HISTORY_FILE)
      with open(workdir / HISTORY_FILE, "a") as history:
        history.write(path.read_text().replace("\n", " ").strip() + "\n")
  if write:
    write_text_atomically(path, json.dumps(resolved, indent=2, sort_keys=True) + "\n")
  return others


def _refuse_another_run(workdir: Path, saved: dict, resolved: dict, training: bool) -> None:
  """`write_or_check_config`'s refusals of a run the checkpoints are not (the model's below)."""
  if saved["dataset"] != resolved["dataset"]:
    raise ValueError(f"workdir={str(workdir)!r} holds a run on {saved['dataset']}, not "
                     f"config.dataset={resolved['dataset']!r}; pass that run's config, or "
                     "fine-tune in a new workdir (config.init_from)")
  if (saved["ema_decay"] > 0) != (resolved["ema_decay"] > 0):  # the state has its average or not
    raise ValueError(f"workdir={str(workdir)!r} holds a run with config.ema_decay="
                     f"{saved['ema_decay']}, not {resolved['ema_decay']}; use a new workdir")
  if training and saved["seed"] != resolved["seed"]:
    raise ValueError(f"workdir={str(workdir)!r} holds a run with config.seed={saved['seed']}, "
                     f"not {resolved['seed']}; a run keeps its seed: use a new workdir")
  # The held-out images are the first N of one fixed order: more would take trained ones.
  if training and resolved["validation_examples"] > saved["validation_examples"]:
    raise ValueError(f"workdir={str(workdir)!r} holds a run that held out "
                     f"{saved['validation_examples']} images and trained on the rest, some "
                     f"of config.validation_examples={resolved['validation_examples']}; use "
                     "a new workdir")


def with_defaults(saved: dict, like: Any) -> dict:
  """`saved` (a config.json's dict) with the fields it lacks taken from `like`'s dataclass
  defaults, at the top and in its `model` section."""
  def defaults(obj) -> dict:
    return {f.name: f.default for f in dataclasses.fields(obj)
            if f.default is not dataclasses.MISSING}

  return {**defaults(like), **saved, "model": {**defaults(like.model), **saved["model"]}}


def saved_config(workdir: str | os.PathLike) -> dict | None:
  """The config.json a run left in `workdir`, or None if there is none yet."""
  path = Path(workdir) / CONFIG_FILE
  return json.loads(path.read_text()) if path.is_file() else None


def read_config(workdir: str | os.PathLike) -> dict:
  path = Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise ValueError(f"workdir={str(workdir)!r} holds no {CONFIG_FILE}: not a training run")
  return json.loads(path.read_text())


class CheckpointError(ValueError):
  """A checkpoint of another model, or a run's file that cannot be written: one line."""


class WriteError(CheckpointError):
  """A run's checkpoint or log could not be written (a full disk, a read-only filesystem)."""


class Checkpoints:
  """Saves the train state every `every_steps` steps, keeping the last `keep`, each with the
  digests of its arrays (`checkpoint_digests`), checked when it is restored."""

  def __init__(self, workdir: Path, every_steps: int = 0, keep: int | None = None,
               read_only: bool = False):
    """`read_only`: restore only, and write nothing (not even to move a damaged checkpoint
    aside): evaluation, prediction and pictures leave a workdir as they found it."""
    self.directory = Path(workdir).absolute() / "checkpoints"
    self.digests = DigestFiles(self.directory.parent)
    self.read_only = read_only
    if read_only:
      options = ocp.CheckpointManagerOptions(
          read_only=True, save_interval_steps=0, max_to_keep=None, create=False,
          cleanup_tmp_directories=False, enable_async_checkpointing=False)
    else:
      options = ocp.CheckpointManagerOptions(
          save_interval_steps=every_steps, max_to_keep=keep, create=True,
          enable_async_checkpointing=False, cleanup_tmp_directories=True)
    with absl_quiet() if read_only else contextlib.nullcontext():  # "directory is read only"
      self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore_latest(self, like: Any) -> Any | None:
    """The newest readable checkpoint, shaped like `like`; None if there is none.

    A checkpoint that cannot be read, or whose arrays differ from the digests recorded when it
    was saved, is reported and moved to `checkpoints_unreadable/` (kept for inspection, out of
    the way of the step that will be saved again). A checkpoint of another model is an error.
    """
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    restored, moved = None, False
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        recorded = self.digests.read(step)
      except ValueError as e:  # its digests are damaged: the checkpoint cannot be checked
        self._move_aside(step, str(e))
        moved = True
        continue
      self._refuse_another_model(step, recorded, abstract)
      try:
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        _verify(step, restored, recorded)
        break
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is handled alike
        restored = None
        self._move_aside(step, str(e).splitlines()[0] if str(e) else type(e).__name__)
        moved = True
    if moved:
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("unreadable checkpoints moved")
      self.manager.reload()
    return restored

  def _refuse_another_model(self, step: int, recorded: Digests | None, abstract: Any) -> None:
    if recorded is None:
      return
    expected = shapes_of(abstract)
    path = first_difference(recorded, expected, keys=("shape", "dtype"))
    if path is not None:
      raise CheckpointError(
          f"checkpoint at step {step} in {self.directory} holds another model: its array "
          f"{path} is {_described(recorded.get(path))}, this model's "
          f"{_described(expected.get(path))}; use another workdir")

  def _move_aside(self, step: int, reason: str) -> None:
    if self.read_only:
      log.warning("checkpoint at step %d cannot be read (%s); left in place, trying an older "
                  "one (the next training run in this workdir moves it aside)", step, reason)
      return
    aside = self.directory.parent / "checkpoints_unreadable" / f"{step}-{time.time():.0f}"
    log.warning("checkpoint at step %d cannot be read (%s); moved to %s, trying an older one",
                step, reason, aside)
    if jax.process_index() == 0:  # one process moves it; the others wait for it
      try:
        aside.parent.mkdir(exist_ok=True)
        shutil.move(str(self.directory / str(step)), aside)
        self.digests.move(step, aside)
      except OSError as e:  # e.g. evaluating a read-only workdir: skip it, leave it be
        log.warning("could not move it aside (%s)", e.strerror or e)

  def save(self, step: int, state: Any, force: bool = False) -> bool:
    """Saves if `step` is due (or `force`), its digests first; returns whether it saved.

    Raises CheckpointError if the checkpoint cannot be written (e.g. the disk is full); the
    checkpoints before it are left as they were.
    """
    if not (force or self.manager.should_save(step)):
      return False
    try:
      if jax.process_index() == 0:
        self.digests.write(step, state)
      saved = self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds
      raise WriteError(f"checkpoint at step {step} could not be written "
                       f"({_first_line_of_cause(e)}); {self.latest_description()}") from e
    if jax.process_index() == 0:
      self.digests.keep_only(self.manager.all_steps())
    return saved

  def latest_description(self) -> str:
    """Where a run that stopped here would resume from, and where to read why, in words."""
    self.manager.reload()
    latest = self.manager.latest_step()
    where = ("there is none" if latest is None
             else f"is step {latest}, in {self.directory / str(latest)}")
    return (f"the latest complete checkpoint {where}; details in "
            f"{self.directory.parent / LOG_FILE}")

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _verify(step: int, restored: Any, recorded: Digests | None) -> None:
  """Raises if `restored` differs from the digests recorded when `step` was saved."""
  if recorded is None:
    log.warning("checkpoint at step %d has no digests (saved before they were recorded): "
                "restored without checking its bytes", step)
    return
  path = first_difference(recorded, digests_of(restored))
  if path is not None:
    raise ValueError(f"its array {path} differs from the digest recorded when it was saved")


def _described(entry: dict | None) -> str:
  return "absent" if entry is None else f"{entry['dtype']} {tuple(entry['shape'])}"


def _first_line_of_cause(error: BaseException) -> str:
  """What went wrong at the bottom, in one line: an OSError's strerror where there is one."""
  while error is not None:
    if isinstance(error, OSError) and error.strerror:
      return error.strerror.lower()
    if "No space left on device" in str(error):
      return "no space left on device"
    error = error.__cause__ or error.__context__
  return "see the run's log"

