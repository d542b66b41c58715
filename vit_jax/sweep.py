"""Sweeps over head counts (and the Q/K/V projection ablation), through `train_and_evaluate`.

Each run has its own workdir under the sweep's root. A finished run leaves
`result.json` there and is skipped when the sweep is run again; an unfinished one
resumes from its checkpoint, since training always does. `vit_jax.sweep_report` turns
the runs' records into tables and a plot.

Layer 4 of vit_jax.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vit_jax import analysis, inference, train
from vit_jax.experiment_config import ExperimentConfig
from vit_jax.files import write_text_atomically
from vit_jax.locks import WorkdirBusyError, WorkdirLock
from vit_jax.metrics import read_metrics
from vit_jax.model_configs import ModelConfig
from vit_jax.models import count_params
from vit_jax.schema import from_mapping

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
  fixed='head_dim' keeps the base head dim (width = heads * head dim).
  A mode is a `model.qkv` value; 'low_rank:R' is qkv='low_rank' with qkv_rank=R.
  """
  if fixed not in ("width", "head_dim"):
    raise ValueError(f"fixed={fixed!r} is not one of 'width', 'head_dim'")
  runs = []
  for qkv in qkv_modes:
    for h in heads:
      width = base.model.hidden_size if fixed == "width" else h * base.model.head_dim
      mode, _, rank = qkv.partition(":")
      model_fields = {**dataclasses.asdict(base.model), "num_heads": h, "hidden_size": width,
                      "qkv": mode, "qkv_rank": int(rank) if rank.isdigit() else rank or None}
      model = from_mapping(ModelConfig, model_fields, path="model")  # validates the combination
      for seed in seeds:
        runs.append((Run(h, width, qkv, seed), dataclasses.replace(base, model=model, seed=seed)))
  return runs


def run_one(run: Run, config: ExperimentConfig, workdir: Path, data: dict) -> dict[str, Any]:
  """Trains (or resumes) one run, measures it, and writes its result.json."""
  resumed = (workdir / "checkpoints").is_dir()
  start = time.monotonic()
  final = train.train_and_evaluate(config, workdir, data=data)
  wall = time.monotonic() - start
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


def finished_record(workdir: Path, config: ExperimentConfig) -> dict[str, Any] | None:
  """The record of a run finished in `workdir`, None if it is not; a finished run of another
  config is refused."""
  result = workdir / RESULT_FILE
  if not result.is_file():
    return None
  record = json.loads(result.read_text())
  # Through validate: a field added since the run finished has its default there.
  finished = _as_json(from_mapping(ExperimentConfig, record["config"]))
  changed = sorted(k for k, v in _as_json(config).items() if finished.get(k) != v)
  if changed:
    raise ValueError(f"{workdir} finished with a different {', '.join(changed)}; "
                     "use another --root for another config")
  return record


def run_all(runs: list[tuple[Run, ExperimentConfig]], root: Path, data: dict | None,
            say: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Runs what is neither finished nor taken, skips the rest; returns the finished records.

  Several processes (hosts, GPUs, a SLURM job array) may share one `root`: each run is
  claimed by a lock in its workdir (`sweep_lock`) before it trains, so a run that another
  process holds is skipped, not trained twice. `data` None: only collect what is finished.
  """
  records = []
  for i, (run, config) in enumerate(runs, 1):
    workdir = Path(root) / run.name
    tag = f"[{i}/{len(runs)}] {run.name}"
    record = finished_record(workdir, config)
    if record is not None:
      say(f"{tag}: finished before, skipped")
    elif data is not None:
      record = _claim_and_run(run, config, workdir, data,
                              lambda text, tag=tag: say(f"{tag}: {text}"))
    if record is not None:
      records.append(record)
  return records


def _claim_and_run(run: Run, config: ExperimentConfig, workdir: Path, data: dict,
                   say: Callable[[str], None]) -> dict[str, Any] | None:
  """Trains the run unless another process holds it: its record, or None if taken."""
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    with WorkdirLock(workdir, "sweep_lock"):
      record = finished_record(workdir, config)  # another process may have just finished it
      if record is not None:
        say("finished by another process")
        return record
      say("resuming" if (workdir / "checkpoints").is_dir() else "training")
      record = run_one(run, config, workdir, data)
      say(f"test accuracy {record['eval_accuracy']:.4f}")
      return record
  except WorkdirBusyError:
    say("taken by another process, skipped")
    return None
