"""A run's workdir: the folder itself, and the config.json beside its checkpoints that says
what the checkpoints are (resuming or evaluating with another model or dataset is refused)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vit_jax.files import write_text_atomically
from vit_jax.locks import WorkdirLock
from vit_jax.run_log import LOG_FILE

log = logging.getLogger("vit_jax")
CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"  # each config.json a resume with other settings replaced


# Folders that hold mount points: a missing folder directly inside one is most likely a
# filesystem that is not mounted, and creating it would write the run to the wrong disk.
_MOUNT_PARENTS = ("/", "/mnt", "/media", "/Volumes")


def prepare_workdir(workdir: str | os.PathLike) -> Path:
  """Creates `workdir` if needed; a clear error if it is a file, unwritable or unmounted."""
  if not str(workdir).strip():  # Path("") is the current folder
    raise ValueError(f"workdir={str(workdir)!r} names no folder")
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


LOCK_FILE = "lock"


@contextlib.contextmanager
def locked_workdir(workdir: str | os.PathLike, lock: bool = True) -> Iterator[Path]:
  """`prepare_workdir(workdir)`, locked for the block where `lock` (the process that owns its
  files). A run refused in a folder it created (a bad field, missing data, a Ctrl-C while
  loading) leaves nothing there but its lock and log: the folder is removed again, so a typo
  in a command leaves no empty run behind."""
  made = [p for p in (Path(workdir).absolute(), *Path(workdir).absolute().parents)
          if not p.exists()]  # the folders this call creates, the workdir's first
  path = prepare_workdir(workdir)
  with WorkdirLock(path, LOCK_FILE) if lock else contextlib.nullcontext():
    try:
      yield path
    except BaseException:
      if made and lock:
        _remove_if_nothing_but(made, (LOCK_FILE, LOG_FILE))
      raise


def _remove_if_nothing_but(made: list[Path], names: tuple[str, ...]) -> None:
  """Removes the workdir `made[0]` where it holds only files named in `names`, then the
  folders above it that were made for it, while empty; anything else, or another process
  writing there meanwhile, leaves them as they are. The caller holds the workdir's lock."""
  if {p.name for p in made[0].iterdir()} <= set(names):
    for name in names:
      (made[0] / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: another process came in meanwhile
      for folder in made:
        folder.rmdir()


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
    changed = sorted(k for k in set(saved["model"]) | set(resolved["model"])
                     if saved["model"].get(k) != resolved["model"].get(k))
    structural = [k for k in changed if k not in _COMPUTATION_ONLY]
    if structural:  # first: another model's config differs in more, and this says why
      diffs = ", ".join(f"model.{k}: {saved['model'].get(k)!r} -> {resolved['model'].get(k)!r}"
                        for k in structural)
      raise ValueError(f"workdir={str(workdir)!r} holds a run of a different model ({diffs}); "
                       f"{'use a new workdir' if training else 'pass the config it ran with'}")
    _refuse_another_run(workdir, saved, resolved, training)
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
                     f"{saved['validation_examples']} images and trained on the rest: "
                     f"config.validation_examples={resolved['validation_examples']} would hold "
                     "out images it trained on; use a new workdir")


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
