"""Sweeps over head counts (and the Q/K/V projection ablation), through `train_and_evaluate`.

Each run has its own workdir under the sweep's root. A finished run leaves
`result.json` there and is skipped when the sweep is run again; an unfinished one
resumes from its checkpoint, since training always does. `vit_jax.sweep_report` turns
the runs' records into tables and a plot.

Layer 4 of vit_jax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vit_jax import analysis, inference, seeds, train
from vit_jax.experiment_config import ExperimentConfig
from vit_jax.files import write_text_atomically
from vit_jax.locks import WorkdirBusyError, WorkdirLock
from vit_jax.metrics import read_metrics
from vit_jax.model_configs import ModelConfig
from vit_jax.models import count_params
from vit_jax.schema import from_mapping
from vit_jax.workdir import saved_config, with_defaults

RESULT_FILE = "result.json"
ENTROPY_IMAGES = 1000  # test images whose attention entropy is averaged


@dataclasses.dataclass(frozen=True)
class Run:
  heads: int
  hidden_size: int
  qkv: str
  seed: int

  @property
  def name(self) -> str:
    return f"{self.qkv.replace(':', '')}_h{self.heads}_w{self.hidden_size}_s{self.seed}"


def plan(base: ExperimentConfig, heads: Sequence[int], seeds: Sequence[int],
         qkv_modes: Sequence[str] = ("fused",), fixed: str = "width"
         ) -> list[tuple[Run, ExperimentConfig]]:
  """Every (qkv, heads, seed) run with its config.

  fixed='width' keeps the base width (head dim = width / heads, as in the design);
  fixed='head_dim' keeps the base head dim (width = heads * head dim); either way the MLP keeps
  the base's mlp_dim.
  A mode is a `model.qkv` value; 'low_rank:R' is qkv='low_rank' with qkv_rank=R.
  """
  if fixed not in ("width", "head_dim"):
    raise ValueError(f"fixed={fixed!r} is not one of 'width', 'head_dim'")
  for name, values in (("heads", list(heads)), ("seeds", list(seeds)), ("qkv", list(qkv_modes))):
    if len(set(values)) < len(values):  # each run would count twice in the tables
      raise ValueError(f"{name}={values} repeats a value")
    if not values:
      raise ValueError(f"{name}=[]: a sweep needs at least one")
  runs = []
  for qkv in qkv_modes:
    mode, colon, rank = qkv.partition(":")
    if (mode == "low_rank") != bool(colon) or (colon and not rank.isdigit()):
      raise ValueError(f"qkv={qkv!r}: a low rank is written with its rank, low_rank:R (e.g. "
                       "low_rank:2), and the other modes without one")
    for h in heads:
      width = base.model.hidden_size if fixed == "width" else h * base.model.head_dim
      model_fields = {**dataclasses.asdict(base.model), "num_heads": h, "hidden_size": width,
                      "qkv": mode, "qkv_rank": int(rank) if rank else None}
      model = from_mapping(ModelConfig, model_fields, path="model")  # validates the combination
      for seed in seeds:
        runs.append((Run(h, width, qkv, seed), dataclasses.replace(base, model=model, seed=seed)))
  return runs


def run_one(run: Run, config: ExperimentConfig, workdir: Path, data: dict) -> dict[str, Any]:
  """Trains (or resumes) one run, measures it, and writes its result.json."""
  resumed = (workdir / "checkpoints").is_dir()
  start = time.monotonic()
  final = train.train_and_evaluate(config, workdir, data=data)
  return _write_record(run, config, workdir, final, time.monotonic() - start, resumed, data)


def run_seeds(group: list[tuple[Run, ExperimentConfig]], root: Path, data: dict
              ) -> list[dict[str, Any]]:
  """Trains (or resumes) the runs of one setting, differing only in seed, as one
  (`vit_jax.seeds`); each run's workdir and result.json are as `run_one` leaves them."""
  workdir = Path(root) / group_name([run for run, _ in group])
  resumed = (workdir / "checkpoints").is_dir()
  start = time.monotonic()
  finals = seeds.train_and_evaluate_seeds(group[0][1], [r.seed for r, _ in group], workdir,
                                          [Path(root) / r.name for r, _ in group], data)
  wall = time.monotonic() - start  # the group's, shared by its runs
  return [_write_record(r, c, Path(root) / r.name, f, wall, resumed, data)
          for (r, c), f in zip(group, finals, strict=True)]


def group_name(runs: list[Run]) -> str:
  """The workdir of a setting's seeds trained as one (their stacked checkpoints), e.g.
  fused_h4_w64_s0-1-2; its seeds are in its name, since another set is another group."""
  setting = dataclasses.replace(runs[0], seed=0).name.removesuffix("_s0")
  return f"{setting}_s{'-'.join(str(run.seed) for run in runs)}"


def _write_record(run: Run, config: ExperimentConfig, workdir: Path, final: dict,
                  wall: float, resumed: bool, data: dict) -> dict[str, Any]:
  state = inference.restore_state(config, workdir)
  _, maps = analysis.collect_attention(state, data["test"]["image"][:ENTROPY_IMAGES],
                                       config.dataset)
  speeds = [r["images_per_sec"] for r in read_metrics(workdir) if "images_per_sec" in r]
  record = {
      **dataclasses.asdict(run), "name": run.name,
      "params": count_params(state.params),
      "eval_accuracy": final["eval_accuracy"], "eval_loss": final["eval_loss"],
      # The first window includes compilation: the median of the rest is the speed.
      "images_per_sec": float(np.median(speeds[1:] if len(speeds) > 1 else speeds)),
      "wall_seconds": wall, "resumed": resumed,
      "attention_entropy": analysis.attention_entropy(maps),
      "config": _as_json(config),
  }
  write_text_atomically(workdir / RESULT_FILE, json.dumps(record, indent=2) + "\n")
  return record


def _as_json(config: ExperimentConfig) -> dict[str, Any]:
  return json.loads(json.dumps(dataclasses.asdict(config)))


# How a run is carried out, not what it computes: a finished or half-trained run may be taken up
# with other values (another host's data folder, another GPU's evaluation batch, 'auto' choices
# resolved on another machine), since the runs' results do not depend on them.
_HOW_NOT_WHAT = ("tfds_data_dir", "idx_dir", "microbatch_size", "eval_batch_size", "parallel",
                 "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                 "keep_checkpoints")
_MODEL_HOW_NOT_WHAT = ("attention_kernel",)  # and compute_dtype where the plan says 'auto'


def changed_fields(saved: dict[str, Any], config: ExperimentConfig) -> list[str]:
  """The fields that change a run's result and differ between `saved` (a config as JSON, e.g.
  a workdir's config.json) and `config`, e.g. ['learning_rate', 'model.num_heads']."""
  planned = _as_json(config)
  saved = with_defaults(saved, config)  # a field added since has its default there
  top = [k for k in planned if k != "model" and k not in _HOW_NOT_WHAT and saved[k] != planned[k]]
  model = [f"model.{k}" for k, v in planned["model"].items()
           if k not in _MODEL_HOW_NOT_WHAT and saved["model"][k] != v
           and not (k == "compute_dtype" and v == "auto")]
  return sorted(top + model)


def finished_record(workdir: Path, config: ExperimentConfig) -> dict[str, Any] | None:
  """The record of a run finished in `workdir`, None if it is not; a finished run of another
  config is refused."""
  result = workdir / RESULT_FILE
  if not result.is_file():
    return None
  record = json.loads(result.read_text())
  _refuse_changed(workdir, record["config"], config, "finished")
  return record


def _refuse_changed(workdir: Path, saved: dict[str, Any] | None, config: ExperimentConfig,
                    state: str) -> None:
  changed = changed_fields(saved, config) if saved is not None else []
  if changed:
    raise ValueError(f"{workdir} {state} with a different {', '.join(changed)}; "
                     "use another --root for another config")


AfterRun = Callable[[ExperimentConfig, Path], Any]


def run_all(runs: list[tuple[Run, ExperimentConfig]], root: Path, data: dict | None,
            say: Callable[[str], None] = print, vmap_seeds: bool = False,
            after_run: AfterRun | None = None) -> list[dict[str, Any]]:
  """Runs what is neither finished nor taken, skips the rest; returns the finished records.

  Several processes (hosts, GPUs, a SLURM job array) may share one `root`: each run is
  claimed by a lock in its workdir (`sweep_lock`) before it trains, so a run that another
  process holds is skipped, not trained twice. `data` None: only collect what is finished.
  `vmap_seeds`: the unfinished seeds of each setting train as one (`run_seeds`).
  `after_run(config, workdir)`: called on every finished run (trained now or before) when
  `data` is given, holding the run's lock, e.g. to analyze its checkpoint (it should skip
  what it finds done); a run another process holds is left to that process.
  """
  records, groups = [], _groups(runs, vmap_seeds)
  for i, group in enumerate(groups, 1):
    tag = f"[{i}/{len(groups)}] {group_name([run for run, _ in group])}"
    tagged = (lambda text, tag=tag: say(f"{tag}: {text}"))
    done = {run: finished_record(Path(root) / run.name, config) for run, config in group}
    left = [(run, config) for run, config in group if done[run] is None]
    if len(left) < len(group):
      skipped = f"{len(group) - len(left)} of {len(group)} " if len(group) > 1 else ""
      tagged(f"{skipped}finished before, skipped")
    if left and data is not None:
      done.update(_claim_and_run(left, Path(root), data, tagged))
    finished = [(run, config) for run, config in group if done[run] is not None]
    if after_run is not None and data is not None:
      for run, config in finished:
        _after_run(after_run, config, Path(root) / run.name, tagged)
    records += [done[run] for run, _ in finished]
  return records


def _after_run(after_run: AfterRun, config: ExperimentConfig, workdir: Path,
               say: Callable[[str], None]) -> None:
  try:
    with WorkdirLock(workdir, "sweep_lock"):
      after_run(config, workdir)
  except WorkdirBusyError:
    say(f"{workdir.name} is held by another process: not analyzed here")


def _groups(runs: list[tuple[Run, ExperimentConfig]], vmap_seeds: bool
            ) -> list[list[tuple[Run, ExperimentConfig]]]:
  """The runs one by one, or with `vmap_seeds` gathered by setting (all but the seed)."""
  if not vmap_seeds:
    return [[entry] for entry in runs]
  groups: dict[Run, list] = {}
  for run, config in runs:
    groups.setdefault(dataclasses.replace(run, seed=0), []).append((run, config))
  return list(groups.values())


def _claim_and_run(group: list[tuple[Run, ExperimentConfig]], root: Path, data: dict,
                   say: Callable[[str], None]) -> dict[Run, dict[str, Any]]:
  """Trains the runs of `group` unless another process holds one: their records ({} if
  taken)."""
  try:
    with contextlib.ExitStack() as locks:
      for run, _ in group:
        (root / run.name).mkdir(parents=True, exist_ok=True)
        locks.enter_context(WorkdirLock(root / run.name, "sweep_lock"))
      # Another process may have just finished some.
      records = {run: finished_record(root / run.name, config) for run, config in group}
      left = [(run, config) for run, config in group if records[run] is None]
      if len(left) < len(group):
        say(f"{len(group) - len(left)} finished by another process")
      # A run with checkpoints of its own (trained alone before, or its group's final state
      # saved before its record could be written) resumes alone; the others train as one.
      alone = [entry for entry in left if (root / entry[0].name / "checkpoints").is_dir()]
      together = [entry for entry in left if entry not in alone]
      for batch in [[entry] for entry in alone] + ([together] if together else []):
        records.update(_train(batch, root, data, say))
      return records
  except WorkdirBusyError:
    say("taken by another process, skipped")
    return {}


def _train(runs: list[tuple[Run, ExperimentConfig]], root: Path, data: dict,
           say: Callable[[str], None]) -> dict[Run, dict[str, Any]]:
  """Trains (or resumes) `runs`, one or several seeds as one; their records."""
  held = root / (group_name([r for r, _ in runs]) if len(runs) > 1 else runs[0][0].name)
  # Resuming would train on under the new values and record only them.
  for workdir, config in [(held, runs[0][1]), *((root / r.name, c) for r, c in runs)]:
    _refuse_changed(workdir, saved_config(workdir), config, "was started")
  say(("resuming" if (held / "checkpoints").is_dir() else "training")
      + (f" {len(runs)} seeds as one" if len(runs) > 1 else ""))
  new = (run_seeds(runs, root, data) if len(runs) > 1
         else [run_one(runs[0][0], runs[0][1], root / runs[0][0].name, data)])
  say("test accuracy " + ", ".join(f"{r['eval_accuracy']:.4f}" for r in new))
  return {run: record for (run, _), record in zip(runs, new, strict=True)}
