"""launch.py with a fault injected into one of its processes, for tests/test_distributed.py.

    python tests/distributed_fault.py FAULT PROCESS [launch.py's flags ...]

FAULT: 'digests': process PROCESS cannot write a checkpoint's digests (a full disk there);
'restore:STEP': the checkpoint of STEP differs from its digests where process PROCESS reads it.
"""

import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
fault, faulty = sys.argv[1], int(sys.argv[2])
sys.argv = [str(REPO / "launch.py"), *sys.argv[3:]]


def in_the_faulty_process() -> bool:
  import jax

  return jax.process_index() == faulty


if fault == "digests":
  from vit_jax.checkpoint_digests import DigestFiles

  write = DigestFiles.write

  def write_or_fail(self, step, state):
    if in_the_faulty_process():
      raise OSError(28, "No space left on device")
    return write(self, step, state)

  DigestFiles.write = write_or_fail
elif fault.startswith("restore:"):
  from vit_jax import checkpoints

  verify = checkpoints._verify

  def verify_or_fail(step, restored, recorded):
    if in_the_faulty_process() and step == int(fault.removeprefix("restore:")):
      raise ValueError("its array params differs from the digest (injected)")
    return verify(step, restored, recorded)

  checkpoints._verify = verify_or_fail
else:
  raise SystemExit(f"unknown fault {fault!r}")
runpy.run_path(str(REPO / "launch.py"), run_name="__main__")
