"""Copy a finished run's latest checkpoint into a folder that ships with the code.

    python experiments/ship_model.py --workdir=runs/mnist --to=pretrained/mnist_seed

Copies config.json, the latest checkpoint with its digests and metrics.jsonl, and nothing
else (no TensorBoard events, logs or older checkpoints), so the shipped run is small. The
copy is used as a read-only workdir: `launch.py --workdir=pretrained/mnist_seed
--mode=predict` (or eval, visualize, export with --output_dir) writes nothing there.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The finished run.", required=True)
flags.DEFINE_string("to", None, "The folder to create (it must not exist).", required=True)


def last_step(workdir: Path) -> int:
  """The step the run in `workdir` ends at, from its config.json and its dataset's size."""
  from vit_jax.experiment_config import validate
  from vit_jax.mnist_source import dataset_spec
  from vit_jax.train import total_train_steps
  from vit_jax.workdir import read_config

  config = validate(read_config(workdir))
  examples = dataset_spec(config.dataset).num_examples["train"] - config.validation_examples
  return total_train_steps(config, min(examples, config.train_examples or examples))


def main(argv):
  del argv
  from vit_jax.command_line import keep_the_console_for_ours

  keep_the_console_for_ours()
  source, target = Path(FLAGS.workdir), Path(FLAGS.to)
  checkpoints = source / "checkpoints"
  steps = sorted(int(p.name) for p in checkpoints.iterdir()
                 if p.name.isdigit()) if checkpoints.is_dir() else []
  if not steps:
    raise ValueError(f"--workdir={str(source)!r} holds no checkpoint")
  if target.exists():
    raise ValueError(f"--to={str(target)!r} exists; ship into a new folder")
  if target.resolve().is_relative_to(source.resolve()):  # `..` and links resolved
    raise ValueError(f"--to={str(target)!r} is inside --workdir={str(source)!r}; ship beside it")
  if not (nearest := next(p for p in target.absolute().parents if p.exists())).is_dir():
    raise ValueError(f"--to={str(target)!r}: {str(nearest)!r} is a file, not a folder")
  latest = str(steps[-1])
  files = [f"checkpoint_digests/{latest}.json", "config.json", "metrics.jsonl"]
  for name in files:
    if not (source / name).is_file():
      raise ValueError(f"--workdir={str(source)!r} has no {name}: not a finished run's folder")
  if steps[-1] < (last := last_step(source)):
    raise ValueError(f"--workdir={str(source)!r} stopped at step {latest} of {last}: finish "
                     f"it first (python launch.py --workdir={source})")
  # Copied beside the target, then renamed: an interrupted copy leaves no half-shipped run.
  target.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
  try:
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's folder is private; a shipped one is not
    shutil.copytree(checkpoints / latest, staging / "checkpoints" / latest)
    (staging / "checkpoint_digests").mkdir()
    for name in files:
      shutil.copy2(source / name, staging / name)
    # launch.py then writes pictures and exports under runs/, never into the shipped folder.
    (staging / "SHIPPED").write_text("A shipped run: launch.py writes nothing here.\n")
    staging.rename(target)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  print(f"shipped step {latest} of {source} into {target}")


if __name__ == "__main__":
  from vit_jax.command_line import ending_in_one_line

  ending_in_one_line(lambda: app.run(main))
