"""Progress output: a tqdm bar on a terminal, plain lines elsewhere."""

import io

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


def test_progress_of_other_processes_writes_nothing():
  stream = FakeTerminal()
  progress = metrics.Progress(total_steps=10, start_step=0, stream=stream, enabled=False)
  progress.update(5, STEP_METRICS)
  progress.message("hello")
  progress.close()
  assert stream.getvalue() == ""
