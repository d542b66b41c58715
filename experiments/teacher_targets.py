"""Teachers' class probabilities for every training image: a file another run learns from.

    python experiments/teacher_targets.py --teachers=runs/a,runs/b,runs/c --out=teachers.npz
    python launch.py --config=experiments/mnist_best.py --workdir=runs/student \
        --config.distill_targets=teachers.npz --config.distill_weight=0.5

Each teacher is a finished run; its latest checkpoint (its moving average where it kept one)
looks at each of the dataset's training images with its own test-time views, and the file
holds the mean of the teachers' probabilities (`vit_jax.distillation`); `--one_view` looks at
each image itself instead (a ninth of the work for runs that average 9 shifts). Each batch is
shared by the CPU's cores (`--cpu_devices`, one device per core by default; a teacher whose
config says `parallel='jit'` keeps to one) and goes through the model in cache-sized passes,
as evaluation does. The teachers must be of one dataset. A
student run that holds images out for validation holds out their targets too: it trains on
the rest, as the teachers did if they held out the same images.
"""

import sys
import time
from pathlib import Path

from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FLAGS = flags.FLAGS
flags.DEFINE_list("teachers", None, "The finished runs' workdirs.", required=True)
flags.DEFINE_string("out", None, "The .npz file to write.", required=True)
flags.DEFINE_integer("batch_size", 500, "Images per forward call (each with its views).")
flags.DEFINE_bool("one_view", False, "Each image itself, not each teacher's test-time views.")
flags.DEFINE_string("cpu_devices", "auto",
                    "Split the CPU into this many JAX devices, which share each batch ('auto': "
                    "one per core, as launch.py); an XLA_FLAGS device count wins.")


def dataset_of(teachers: list[str]) -> tuple[str, str | None, str, int]:
  """(dataset, tfds_data_dir, idx_dir) the teachers share, and the fewest training images
  any of them held out for validation; a one-line error for teachers of several datasets."""
  from vit_jax.experiment_config import validate
  from vit_jax.workdir import read_config

  configs = [validate(read_config(t)) for t in teachers]
  if len(names := {c.dataset for c in configs}) > 1:
    raise ValueError(f"--teachers={','.join(teachers)} were trained on {sorted(names)}: "
                     "one dataset's teachers only")
  held_out = min(c.validation_examples for c in configs)
  return configs[0].dataset, configs[0].tfds_data_dir, configs[0].idx_dir, held_out


def main(argv):
  del argv
  from vit_jax import distillation, host_cpu, mnist_source
  from vit_jax.command_line import keep_the_console_for_ours

  keep_the_console_for_ours()
  if FLAGS.batch_size < 1:
    raise ValueError(f"--batch_size={FLAGS.batch_size} must be positive")
  print(f"devices: {host_cpu.configure(FLAGS.cpu_devices, (FLAGS.batch_size,))}", flush=True)
  dataset, tfds_data_dir, idx_dir, held_out = dataset_of(FLAGS.teachers)
  images, labels = mnist_source.load_split(dataset, "train", tfds_data_dir, idx_dir)
  start = time.monotonic()
  every = 20 * FLAGS.batch_size  # a line every 20 batches (of batch_size, before rounding)
  shown = {}

  def progress(teacher, done, total):
    if done == total or done // every > shown.get(teacher, 0) // every:
      shown[teacher] = done
      print(f"teacher {teacher + 1}/{len(FLAGS.teachers)} ({FLAGS.teachers[teacher]}): "
            f"{done}/{total} images, {time.monotonic() - start:.0f} s", flush=True)

  targets = distillation.teacher_targets(FLAGS.teachers, images, FLAGS.batch_size, progress,
                                         FLAGS.one_view)
  distillation.save_targets(FLAGS.out, targets, images, labels, dataset, FLAGS.teachers,
                            held_out)
  agree = float((targets.argmax(-1) == labels).mean())
  print(f"wrote {FLAGS.out}: {len(labels)} {dataset} training images, the teachers' mean "
        f"agrees with {agree:.2%} of their labels")


if __name__ == "__main__":
  from vit_jax.command_line import run_command

  run_command(lambda: None, main)  # the flags are defined above; a bad value ends in one line
