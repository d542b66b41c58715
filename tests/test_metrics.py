"""Progress output: a tqdm bar on a terminal, plain lines elsewhere."""

import io
import os
import struct

import numpy as np
import pytest

from vit_jax import metrics

STEP_METRICS = {"train_loss": 0.5, "train_accuracy": 0.875, "images_per_sec": 1234.0}


class FakeTerminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_draws_a_bar_with_loss_and_messages_on_a_terminal():
  stream = FakeTerminal()
  progress = metrics.Progress(total_steps=10, start_step=2, stream=stream)
  progress.update(6, STEP_METRICS)
  progress.message("step 6: eval_accuracy=0.9")
  progress.close()
  out = stream.getvalue()
  assert "6/10" in out and "train_loss=0.5" in out and "train_accuracy=0.875" in out
  assert "step 6: eval_accuracy=0.9\n" in out
  assert "\r" in out  # redrawn in place, not one line per update


def test_progress_writes_plain_lines_elsewhere():
  stream = io.StringIO()
  progress = metrics.Progress(total_steps=10, start_step=2, stream=stream)
  progress.update(6, STEP_METRICS)
  progress.message("step 6: eval_accuracy=0.9")
  progress.close()
  first, second = stream.getvalue().splitlines()
  assert first.startswith("step 6/10 train_loss=0.5 train_accuracy=0.875 1234 img/s ETA 0m")
  assert second == "step 6: eval_accuracy=0.9"
  assert "\r" not in stream.getvalue()


def test_progress_whose_reader_left_says_so_and_writes_no_more():
  class ClosedPipe(io.StringIO):  # `launch.py 2>&1 | head` once head has exited
    writes = 0

    def write(self, text):
      self.writes += 1
      raise BrokenPipeError(32, "Broken pipe")

  pipe = ClosedPipe()
  progress = metrics.Progress(total_steps=10, start_step=2, stream=pipe)
  assert not progress.console_closed
  progress.update(6, STEP_METRICS)  # no error: the training loop goes on to its checkpoint
  assert progress.console_closed
  progress.message("step 6: eval_accuracy=0.9")
  progress.update(7, STEP_METRICS)
  assert pipe.writes == 1


def test_progress_of_other_processes_writes_nothing():
  stream = FakeTerminal()
  progress = metrics.Progress(total_steps=10, start_step=0, stream=stream, enabled=False)
  progress.update(5, STEP_METRICS)
  progress.message("hello")
  progress.close()
  assert stream.getvalue() == ""


class _Recorder:
  """A MetricWriter and a Progress in one: what the window writes."""

  def __init__(self):
    self.written = []

  def write(self, step, metrics):
    self.written.append((step, metrics))

  update = write


def test_metrics_window_logs_means_rate_and_learning_rate_then_starts_again(monkeypatch):
  clock = iter([100.0, 102.0, 102.0])  # opened at 100; flushed at 102, then reopened
  monkeypatch.setattr(metrics.time, "monotonic", lambda: next(clock))
  recorder = _Recorder()
  window = metrics.MetricsWindow(lambda m: {k: np.asarray(v) for k, v in m.items()}, recorder,
                                 recorder, batch_size=64, learning_rate=lambda s: s / 100)
  window.flush(5)  # nothing pending: nothing written
  assert recorder.written == []
  # Steps 8 and 9 in one call of three steps (the third column not run), step 10 alone.
  window.add(7, 2, {"loss": [1.0, 2.0, 0.0], "accuracy": [0.5, 0.5, 0.0]})
  window.add(9, 1, {"loss": [6.0, 0.0, 0.0], "accuracy": [1.0, 0.0, 0.0]})
  window.flush(10)
  means = {"train_loss": 3.0, "train_accuracy": 2 / 3, "learning_rate": 0.09,
           "images_per_sec": 3 * 64 / 2.0}
  assert recorder.written == [(10, means)] * 2  # to the writer and to the progress
  assert window.last == means and window.pending == []


def test_metrics_window_stops_on_a_non_finite_loss_and_names_its_step():
  recorder = _Recorder()
  window = metrics.MetricsWindow(dict, recorder, recorder, 64, lambda s: 0.0)
  window.add(2, 1, {"loss": [0.5, 0.0]})
  window.add(3, 2, {"loss": [1.0, float("nan")]})  # steps 4 and 5: the second is NaN
  with pytest.raises(FloatingPointError, match="training loss is nan at step 5"):
    window.flush(5)
  assert recorder.written == []  # nothing of a non-finite window is logged


def test_a_killed_run_s_half_line_is_skipped_and_the_next_run_starts_a_new_line(tmp_path):
  writer = metrics.MetricWriter(tmp_path)
  writer.write(1, {"train_loss": 0.5})
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:  # killed in the middle of a record
    f.write('{"step": 2, "train_lo')
  resumed = metrics.MetricWriter(tmp_path)
  resumed.write(2, {"train_loss": 0.25})
  resumed.close()
  assert [(r["step"], r["train_loss"]) for r in metrics.read_metrics(tmp_path)] == [
      (1, 0.5), (2, 0.25)]


def test_a_resumed_run_forgets_the_steps_it_takes_again(tmp_path):
  writer = metrics.MetricWriter(tmp_path)
  for step in range(2, 12, 2):  # killed after logging step 10; its last checkpoint was step 6
    writer.write(step, {"train_loss": 1 / step})
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 12, "train_lo')
  resumed = metrics.MetricWriter(tmp_path)
  resumed.resume_at(6, last_step=20)
  resumed.write(8, {"train_loss": 0.5})
  resumed.close()
  assert [(r["step"], r["train_loss"]) for r in metrics.read_metrics(tmp_path)] == [
      (2, 0.5), (4, 0.25), (6, 1 / 6), (8, 0.5)]
  # TensorBoard is told to drop the first file's steps 7 on (its SessionLog START, as tf's
  # purge_step), before the resumed run's own step 8.
  events = [(e.step, e.HasField("session_log"))
            for path in sorted((tmp_path / "tensorboard").iterdir()) for e in read_events(path)
            if not e.file_version]
  assert events[-2:] == [(7, True), (8, False)]


def read_events(path):
  """The Event protos of a TensorBoard file (TFRecords: length, its CRC, data, the data's CRC)."""
  from tensorboard.compat.proto import event_pb2

  data, at = path.read_bytes(), 0
  while at < len(data):
    (length,) = struct.unpack("<Q", data[at:at + 8])
    yield event_pb2.Event.FromString(data[at + 12:at + 12 + length])
    at += 12 + length + 4


def test_a_finished_run_started_again_logs_its_final_evaluation_once(tmp_path):
  writer = metrics.MetricWriter(tmp_path)
  writer.write(8, {"train_loss": 0.5})
  writer.write(8, {"eval_loss": 0.25, "eval_accuracy": 0.9})  # the final evaluation
  writer.close()
  again = metrics.MetricWriter(tmp_path)
  again.resume_at(8, last_step=8)  # at its last step: it evaluates again
  again.write(8, {"eval_loss": 0.25, "eval_accuracy": 0.9})
  again.close()
  assert [sorted(r) for r in metrics.read_metrics(tmp_path)] == [
      ["step", "time", "train_loss"], ["eval_accuracy", "eval_loss", "step", "time"]]


def test_tensorboard_shows_a_finished_run_s_final_evaluation_once_after_a_restart(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator

  writer = metrics.MetricWriter(tmp_path)
  writer.write(4, {"train_loss": 0.75})
  writer.write(8, {"train_loss": 0.5})
  writer.write(8, {"eval_loss": 0.25})  # the final evaluation
  writer.close()
  again = metrics.MetricWriter(tmp_path)
  again.resume_at(8, last_step=8)
  again.write(8, {"eval_loss": 0.125})  # evaluated again, e.g. on the averaged weights
  again.close()
  shown = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  shown.Reload()  # what TensorBoard plots, its purge of a restarted run's steps applied
  assert {tag: [(s.step, s.value) for s in shown.Scalars(tag)]
          for tag in shown.Tags()["scalars"]} == {
      "train_loss": [(4, 0.75), (8, 0.5)], "eval_loss": [(8, 0.125)]}


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_closing_after_a_failed_write_keeps_that_write_s_error(tmp_path):
  writer = metrics.MetricWriter(tmp_path)
  writer.jsonl.close()
  writer.jsonl = open("/dev/full", "a")  # noqa: SIM115 - a disk that is full
  with pytest.raises(OSError, match="No space left on device"):
    writer.write(1, {"train_loss": 0.5})
  writer.close()  # the record still in its buffer fails again, and is not raised over it
