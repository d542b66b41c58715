"""A small training run in its own process, for tests that kill or signal it.

    python tests/train_driver.py WORKDIR TFDS_DIR [--die-while-saving STEP] [--die-while-restoring]

--die-while-saving makes the process SIGKILL itself in the middle of writing the
checkpoint of STEP: after orbax has written it to its temporary folder, before the
rename that completes it. --die-while-restoring makes it SIGKILL itself once orbax has read
the latest checkpoint back, before the run has used it; --die-while-moving-aside, between
moving an unreadable checkpoint aside and moving its digests after it.
"""

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_reliability import driver_config  # noqa: E402

from vit_jax import input_pipeline, train  # noqa: E402


def die_while_saving(step: int) -> None:
  real_rename = os.rename
  tmp_name = f"{step}.orbax-checkpoint-tmp"

  def rename_or_die(src, dst, *a, **k):
    if os.path.basename(str(src)) == tmp_name:
      os.kill(os.getpid(), signal.SIGKILL)
    return real_rename(src, dst, *a, **k)

  os.rename = rename_or_die


def die_while_restoring() -> None:
  import orbax.checkpoint as ocp

  real_restore = ocp.CheckpointManager.restore

  def restore_then_die(self, *a, **k):
    real_restore(self, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)

  ocp.CheckpointManager.restore = restore_then_die


def die_while_moving_aside() -> None:
  """Dies between moving an unreadable checkpoint aside and moving its digests after it."""
  from vit_jax.checkpoint_digests import DigestFiles

  DigestFiles.move = lambda self, step, folder: os.kill(os.getpid(), signal.SIGKILL)


def slow_steps(seconds: float) -> None:
  real_indices = input_pipeline.EpochOrder.indices

  def slow_indices(self, step):
    time.sleep(seconds)
    return real_indices(self, step)

  input_pipeline.EpochOrder.indices = slow_indices


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("tfds_dir")
  parser.add_argument("--die-while-saving", type=int, default=None)
  parser.add_argument("--die-while-restoring", action="store_true")
  parser.add_argument("--die-while-moving-aside", action="store_true")
  parser.add_argument("--step-delay", type=float, default=0.02,
                      help="seconds of sleep per step, so that a kill can land mid-run")
  args = parser.parse_args()
  logging.getLogger("absl").setLevel(logging.WARNING)
  if args.die_while_saving is not None:
    die_while_saving(args.die_while_saving)
  if args.die_while_restoring:
    die_while_restoring()
  if args.die_while_moving_aside:
    die_while_moving_aside()
  slow_steps(args.step_delay)
  result = train.train_and_evaluate(driver_config(args.tfds_dir), args.workdir)
  print(f"finished at step {result['step']}", flush=True)


if __name__ == "__main__":
  main()
