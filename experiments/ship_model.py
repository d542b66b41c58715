"""Copy a finished run's latest checkpoint into a folder that ships with the code.

    python experiments/ship_model.py --workdir=runs/mnist --to=pretrained/mnist_seed

Copies config.json, the latest checkpoint with its digests and metrics.jsonl, and nothing
else (no TensorBoard events, logs or older checkpoints), so the shipped run is small. The
copy is used as a read-only workdir: `launch.py --workdir=pretrained/mnist_seed
--mode=predict` (or eval, visualize, export with --output_dir) writes nothing there.
"""

import shutil
import sys
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The finished run.", required=True)
flags.DEFINE_string("to", None, "The folder to create (it must not exist).", required=True)


def main(argv):
  del argv
  source, target = Path(FLAGS.workdir), Path(FLAGS.to)
  steps = sorted(int(p.name) for p in (source / "checkpoints").iterdir() if p.name.isdigit())
  if not steps:
    raise ValueError(f"--workdir={str(source)!r} holds no checkpoint")
  if target.exists():
    raise ValueError(f"--to={str(target)!r} exists; ship into a new folder")
  latest = str(steps[-1])
  (target / "checkpoint_digests").mkdir(parents=True)
  shutil.copytree(source / "checkpoints" / latest, target / "checkpoints" / latest)
  shutil.copy2(source / "checkpoint_digests" / f"{latest}.json", target / "checkpoint_digests")
  for name in ("config.json", "metrics.jsonl"):
    shutil.copy2(source / name, target / name)
  # launch.py then writes pictures and exports under runs/, never into the shipped folder.
  (target / "SHIPPED").write_text("A shipped run: launch.py writes nothing here.\n")
  print(f"shipped step {latest} of {source} into {target}")


if __name__ == "__main__":
  try:
    app.run(main)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
