"""Orbax checkpoints of the train state, each with the digests of its arrays.

Orbax writes each checkpoint into a temporary folder and renames it when complete,
and deletes an old checkpoint only after a newer one is complete; a checkpoint
that cannot be read is reported and the next older one is used.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable
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
from vit_jax.parallel import gathered
from vit_jax.run_log import LOG_FILE, absl_quiet

log = logging.getLogger("vit_jax")


# (a state's abstract arrays, the function that takes a state restored with them to the
# current layout, or None for the current layout itself)
Layout = tuple[Any, Callable[[Any], Any] | None]


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

  def restore_latest(self, like: Any, earlier: Layout | None = None) -> Any | None:
    """The newest readable checkpoint, shaped like `like`; None if there is none.

    `earlier`: (`like` as an earlier version of this code saved it, the function that takes
    a checkpoint restored in that layout to `like`'s), e.g. `train_state.per_array_moments`:
    a checkpoint whose digests record that layout is read in it and brought up to date.
    A checkpoint that cannot be read, or whose arrays differ from the digests recorded when it
    was saved, is reported and moved to `checkpoints_unreadable/` (kept for inspection, out of
    the way of the step that will be saved again). A checkpoint of another model is an error.
    """
    layouts = [(like, None)] + ([earlier] if earlier else [])
    layouts = [(jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree), upgrade)
               for tree, upgrade in layouts]
    restored, moved = None, False
    for step in sorted(self.manager.all_steps(), reverse=True):
      restored, why = self._read(step, layouts)
      if why is None:
        break
      self._move_aside(step, why)
      moved = True
    if moved:
      gathered([0])  # every process waits for process 0 to have moved them
      self.manager.reload()
    return restored

  def _read(self, step: int, layouts: list[Layout]) -> tuple[Any | None, str | None]:
    """(the checkpoint at `step`, None) or (None, why it cannot be read). With several
    processes, each step is read by all or none (orbax's restore is collective) and is
    readable where it is in all: every process goes on from the same step."""
    try:
      recorded, why = self.digests.read(step), None
    except ValueError as e:  # its digests are damaged: the checkpoint cannot be checked
      recorded, why = None, str(e)
    if (why := _in_every_process(why)) is not None:
      return None, why
    # Without digests (saved before they were recorded) its layout is not known: each is tried,
    # all processes together.
    reasons = []
    for abstract, upgrade in (layouts if recorded is None
                              else [self._layout_of(step, recorded, layouts)]):
      try:
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        _verify(step, restored, recorded)
        why = None
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is handled alike
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
      if (why := _in_every_process(why)) is None:
        return (upgrade(restored) if upgrade else restored), None
      reasons.append(why)
    return None, reasons[0]

  def _layout_of(self, step: int, recorded: Digests, layouts: list[Layout]) -> Layout:
    """The layout whose arrays the digests of `step` record; a checkpoint in none of them is
    another model's: an error."""
    differences = []
    for layout in layouts:
      expected = shapes_of(layout[0])
      path = first_difference(recorded, expected, keys=("shape", "dtype"))
      if path is None:
        return layout
      differences.append((path, expected))
    path, expected = differences[0]  # named against the current layout
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
      self._write_digests(step, state)
      saved = self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds
      raise WriteError(f"checkpoint at step {step} could not be written "
                       f"({_first_line_of_cause(e)}); {self.latest_description()}") from e
    if jax.process_index() == 0:
      self.digests.keep_only(self.manager.all_steps())
    return saved

  def _write_digests(self, step: int, state: Any) -> None:
    """Process 0 writes them; every process learns whether it could before the save, which
    is collective: a process that raised alone would leave the others waiting in it."""
    failure = None
    if jax.process_index() == 0:
      try:
        self.digests.write(step, state)
      except Exception as e:  # noqa: BLE001 - raised below, in every process
        failure = e
    if gathered([failure is not None]).any():
      raise failure or RuntimeError("process 0 could not write the checkpoint's digests")

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


def _in_every_process(why: str | None) -> str | None:
  """`why` a step cannot be read here, or where another process could not read it."""
  failed = gathered([why is not None])[:, 0]
  if why is None and failed.any():
    return f"process {int(failed.argmax())} could not read it"
  return why


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

