"""Where a run's numbers go: JSON lines, TensorBoard, and a progress line or bar."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# TensorBoard's own protos and record writer, which need no TensorFlow: flax's writer (and
# TensorBoard's EventFileWriter, when TensorFlow is installed) would import it, seconds of
# every run's start.
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from vit_jax.files import write_text_atomically


class MetricWriter:
  """Appends {'step': s, 'time': t, **metrics} to workdir/metrics.jsonl and to TensorBoard."""

  def __init__(self, workdir: Path, enabled: bool = True):
    self.enabled = enabled
    if not enabled:  # another process writes
      return
    self.path = Path(workdir) / "metrics.jsonl"
    self.jsonl = open(self.path, "a")  # noqa: SIM115 - closed in close()
    if not _ends_a_line(self.path):  # a killed run's half line: this run's records start anew
      self.jsonl.write("\n")
    self.tensorboard = _open_event_file(Path(workdir) / "tensorboard")

  def resume_at(self, step: int, last_step: int) -> None:
    """Forgets the records after `step`, where this run goes on from: a run killed after its
    last checkpoint logged steps that it now takes again, and each step is logged once. At
    `last_step` the final evaluation is done again, so its record goes too."""
    if not self.enabled:
      return
    lines = self.path.read_text().splitlines()
    kept = [line for line in lines if _step_of(line) is not None and (
        _step_of(line) < step or _step_of(line) == step and not (
            step == last_step and '"eval_loss"' in line))]
    if kept != lines:
      self.jsonl.close()
      write_text_atomically(self.path, "".join(line + "\n" for line in kept))
      self.jsonl = open(self.path, "a")  # noqa: SIM115 - closed in close()
    # TensorBoard drops the earlier files' events from the START's step on, as tf's purge_step
    # does. At the last step that drops the final evaluation, and the step's other records
    # with it, so those are written again.
    purge_from = step if step == last_step else step + 1
    self.tensorboard.write(event_pb2.Event(
        wall_time=time.time(), step=purge_from,
        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)).SerializeToString())
    for line in kept:
      if _step_of(line) >= purge_from:
        self._to_tensorboard(json.loads(line))
    self.tensorboard.flush()

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    # `time` (Unix seconds) lets a benchmark read off when an accuracy was first reached.
    record = {"step": int(step), "time": time.time(),
              **{k: float(v) for k, v in metrics.items()}}
    self.jsonl.write(json.dumps(record) + "\n")
    self.jsonl.flush()
    self._to_tensorboard(record)
    self.tensorboard.flush()

  def _to_tensorboard(self, record: dict[str, Any]) -> None:
    values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in record.items()
              if k not in ("step", "time")]
    self.tensorboard.write(event_pb2.Event(
        wall_time=record.get("time", time.time()), step=record["step"],
        summary=summary_pb2.Summary(value=values)).SerializeToString())

  def close(self) -> None:
    if not self.enabled:
      return
    # Every record was flushed as it was written; what a close would still write is one that
    # failed (a full disk), whose error is already on its way and must not be replaced.
    with contextlib.suppress(OSError):
      self.jsonl.close()
    with contextlib.suppress(OSError):
      self.tensorboard.close()


def _step_of(line: str) -> int | None:
  """A metrics.jsonl line's step; None for a half line a killed run left."""
  try:
    return int(json.loads(line)["step"])
  except (json.JSONDecodeError, KeyError, TypeError, ValueError):
    return None


def _ends_a_line(path: Path) -> bool:
  """Whether `path` is empty or its last byte ends a line."""
  with open(path, "rb") as f:
    if f.seek(0, os.SEEK_END) == 0:
      return True
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def _open_event_file(folder: Path) -> RecordWriter:
  """A new TensorBoard event file in `folder`, its version record written."""
  folder.mkdir(parents=True, exist_ok=True)
  now = time.time()
  path = folder / f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}"
  writer = RecordWriter(open(path, "ab"))  # noqa: SIM115 - closed by MetricWriter.close()
  writer.write(event_pb2.Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
  return writer


def read_metrics(workdir: str | Path) -> list[dict[str, float]]:
  """The records of `workdir`/metrics.jsonl, less a line a killed run left half written."""
  records = []
  for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
    with contextlib.suppress(json.JSONDecodeError):
      records.append(json.loads(line))
  return records


class Progress:
  """A tqdm bar on a terminal, plain log lines elsewhere (files, CI)."""

  def __init__(self, total_steps: int, start_step: int, stream=None, enabled: bool = True):
    self.enabled = enabled
    self.stream = stream or sys.stderr
    self.total, self.start = total_steps, start_step
    self.t0 = time.monotonic()
    self.bar = None
    self.console_closed = False  # its reader went away (`| head`): the loop saves and stops
    if enabled and self.stream.isatty():
      from tqdm import tqdm

      self.bar = tqdm(total=total_steps, initial=start_step, file=self.stream,
                      unit="step", dynamic_ncols=True)

  def update(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    shown = {k: f"{v:.4g}" for k, v in metrics.items() if k in ("train_loss", "train_accuracy")}
    if self.bar is not None:
      self.bar.set_postfix(shown, refresh=False)
      self.bar.update(step - self.bar.n)
      return
    done = step - self.start
    elapsed = time.monotonic() - self.t0
    eta = elapsed / max(done, 1) * (self.total - step)
    fields = " ".join(f"{k}={v}" for k, v in shown.items())
    self._say(f"step {step}/{self.total} {fields} "
              f"{metrics.get('images_per_sec', float('nan')):.0f} img/s ETA {_duration(eta)}")

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(text, file=self.stream)  # tqdm.write defaults to stdout
    else:
      self._say(text)

  def _say(self, line: str) -> None:
    try:
      print(line, file=self.stream, flush=True)
    except BrokenPipeError:
      self.enabled, self.console_closed = False, True

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  minutes, secs = divmod(int(seconds), 60)
  return f"{minutes}m{secs:02d}s"


class MetricsWindow:
  """The training metrics of the steps since the last log line, and what they are logged as.

  Each step's metrics stay on the device until `flush` (fetching them every step would make
  the host wait for each step before dispatching the next); `flush` fetches them, stops on a
  non-finite loss or gradient, and writes their means with the learning rate and the images/s
  since the window opened. `label` names whose metrics they are in its error (' of seed 3').
  """

  def __init__(self, fetch: Callable[[Any], dict[str, Any]], writer: MetricWriter,
               progress: Progress, batch_size: int, learning_rate: Callable[[int], Any],
               label: str = ""):
    self.fetch, self.writer, self.progress, self.label = fetch, writer, progress, label
    self.batch_size, self.learning_rate = batch_size, learning_rate
    self.pending: list[tuple[int, int, Any]] = []  # (first step, count, metrics)
    self.last: dict[str, float] = {}  # the means most recently written
    self.restart_clock()

  def restart_clock(self) -> None:
    """Starts timing again, e.g. after an evaluation that is no training time."""
    self.started = time.monotonic()

  def add(self, first: int, count: int, metrics: Any) -> None:
    """`metrics` of the `count` updates after step `first`, stacked on a leading axis (of
    `steps.compile_train_steps`' steps per call), still on the device."""
    self.pending.append((first, count, metrics))

  def flush(self, step: int) -> None:
    """Fetches the pending metrics, raises FloatingPointError on a non-finite loss or
    gradient norm, writes
    their means at `step`; nothing if none is pending."""
    if not self.pending:
      return
    fetched = []  # (step, that step's metrics)
    for first, count, metrics in self.pending:
      stacked = self.fetch(metrics)
      fetched += [(first + j + 1, {k: v[j] for k, v in stacked.items()}) for j in range(count)]
    for s, m in fetched:
      for key, name in (("loss", "loss"), ("grad_norm", "gradient norm")):
        if key in m and not np.all(np.isfinite(m[key])):
          raise FloatingPointError(f"training {name}{self.label} is {m[key]} at step {s}; no "
                                   "checkpoint of a non-finite state was saved")
    elapsed = max(time.monotonic() - self.started, 1e-9)
    means = {f"train_{k}": float(np.mean([np.mean(m[k]) for _, m in fetched]))
             for k in fetched[0][1]}
    means["learning_rate"] = float(self.learning_rate(step - 1))
    means["images_per_sec"] = len(fetched) * self.batch_size / elapsed
    self.writer.write(step, means)
    self.progress.update(step, means)
    self.last = means
    self.pending = []
    self.restart_clock()
