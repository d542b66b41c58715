"""A run's workdir: orbax checkpoints of the train state, and the config beside them.

Orbax writes each checkpoint into a temporary folder and renames it when complete,
and deletes an old checkpoint only after a newer one is complete; a checkpoint
that cannot be read is reported and the next older one is used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("vit_jax")
CONFIG_FILE = "config.json"


def prepare_workdir(workdir: str | os.PathLike) -> Path:
  """Creates `workdir` if needed; a clear error if it is a file or unwritable."""
  path = Path(workdir).absolute()
  if path.exists() and not path.is_dir():
    raise ValueError(f"workdir={str(workdir)!r} is a file, not a folder")
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"workdir={str(workdir)!r} cannot be created: {e.strerror}") from None
  if not os.access(path, os.W_OK):
    raise ValueError(f"workdir={str(workdir)!r} is not writable")
  return path


def write_or_check_config(workdir: Path, config: Any) -> None:
  """Saves the resolved config in `workdir`, or refuses one that changes the model.

  A workdir's checkpoints only fit the model they were trained with, so resuming
  with a different `model` section is an error; other changes are allowed.
  """
  resolved = dataclasses.asdict(config)
  path = workdir / CONFIG_FILE
  if path.exists():
    saved = json.loads(path.read_text())
    changed = sorted(k for k in set(saved["model"]) | set(resolved["model"])
                     if saved["model"].get(k) != resolved["model"].get(k))
    if changed:
      diffs = ", ".join(f"model.{k}: {saved['model'].get(k)!r} -> {resolved['model'].get(k)!r}"
                        for k in changed)
      raise ValueError(f"workdir={str(workdir)!r} holds a run of a different model ({diffs}); "
                       "use a new workdir")
    others = sorted(k for k in resolved if k != "model" and saved.get(k) != resolved[k])
    if others:
      log.warning("resuming %s with changed settings: %s", workdir, ", ".join(others))
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")
  tmp.replace(path)


def read_config(workdir: str | os.PathLike) -> dict:
  path = Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise ValueError(f"workdir={str(workdir)!r} holds no {CONFIG_FILE}: not a training run")
  return json.loads(path.read_text())


class Checkpoints:
  """Saves the train state every `every_steps` steps, keeping the last `keep`."""

  def __init__(self, workdir: Path, every_steps: int, keep: int):
    self.manager = ocp.CheckpointManager(
        Path(workdir).absolute() / "checkpoints",
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps, max_to_keep=keep, create=True,
            enable_async_checkpointing=False, cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore_latest(self, like: Any) -> Any | None:
    """The newest readable checkpoint, shaped like `like`; None if there is none."""
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped alike
        log.warning("checkpoint at step %d cannot be read (%s: %s); trying an older one",
                    step, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    return None

  def save(self, step: int, state: Any, force: bool = False) -> bool:
    """Saves if `step` is due (or `force`); returns whether it saved."""
    return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
