"""Train, evaluate or use a ViT from the command line.

    python launch.py --config=experiments/mnist.py --workdir=runs/mnist
    python launch.py --config=experiments/mnist.py --config.model.num_heads=8 --workdir=runs/h8
    python launch.py --workdir=runs/h8      # resumes it, interrupted, with its own config
    python launch.py --workdir=runs/h8 --mode=eval
    python launch.py --workdir=runs/h8 --mode=eval --config.eval_max_shift=1
    python launch.py --workdir=runs/h8 --mode=predict --images=digit.png,other.npy
    python launch.py --workdir=runs/h8 --mode=visualize
    python launch.py --workdir=runs/h8 --mode=export
    python launch.py --workdir=runs/h8 --mode=analyze

Without --config, a workdir that holds a run is resumed, evaluated or used with the config
the run recorded (WORKDIR/config.json), changed by any --config.x flags; --config=FILE takes
that file's instead. A new workdir without --config trains experiments/mnist.py.

Runs on whatever JAX finds: CPU, GPU or TPU.
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
# The default experiment, found from any working directory.
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments",
                              "mnist.py")


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value else None

flags.DEFINE_string("workdir", None, "Folder for checkpoints, config and metrics.",
                    required=True)
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "visualize", "export",
                                   "analyze"], "What to do.")
flags.DEFINE_list("images", [], "predict: image files (PNG or .npy, 28x28 grey).")
flags.DEFINE_integer("num_images", None, "visualize: how many test digits to draw (default "
                     "4); analyze: how many test images to measure with (default 1000).")
flags.DEFINE_string("output_dir", None, "visualize, export, analyze: where to write (default: "
                    "WORKDIR/visualize, WORKDIR/saved_model, WORKDIR/analysis, or for a shipped "
                    "run, marked by a SHIPPED file, runs/<its name>/...); the other modes only "
                    "read.")
flags.DEFINE_enum("ablation", "zero", ["zero", "mean"], "analyze: how a head is removed: its "
                  "output zeroed, or replaced by its mean output over the images.")
# Several processes (hosts), on JAX's own multi-controller runtime. Either name the
# coordinator and this process, or let JAX detect the cluster (SLURM, Open MPI, TPU pods).
flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                    "host:port of process 0's coordinator (env JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", _env_int("JAX_NUM_PROCESSES"),
                     "How many processes in all (env JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", _env_int("JAX_PROCESS_ID"),
                     "This process's rank, 0 .. num_processes-1 (env JAX_PROCESS_ID).")
flags.DEFINE_string("cpu_devices", "auto",
                    "Split the CPU into this many JAX devices (data parallelism across cores "
                    "with parallel=auto/pmap; see docs/performance.md). 'auto': one per core, "
                    "or the most that split the batches evenly. An XLA_FLAGS device count "
                    "wins. No effect on GPU or TPU.")
flags.DEFINE_string(
    "compilation_cache_dir",
    os.environ.get("VIT_JAX_COMPILATION_CACHE_DIR",
                   os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "vit_jax", "xla")),
    "JAX's persistent compilation cache: a later run of the same config loads its compiled "
    "steps from here instead of compiling them again. It grows by a few MB per new config "
    "and may be deleted at any time. Empty: off (env VIT_JAX_COMPILATION_CACHE_DIR).")
flags.DEFINE_bool("distributed", False,
                  "Initialise JAX's distributed runtime from the cluster's environment.")


def _config_of_this_command():
  """(the config to run, where it came from): --config's file with its --config.x flags, or,
  without --config in a workdir that holds a run, the config the run recorded with the
  --config.x flags on top: a run of other settings (a sweep's, a shipped one, an interrupted
  `mnist_best.py`) is resumed, evaluated, drawn or exported without repeating them."""
  from vit_jax.command_line import checked_config, recorded_config
  from vit_jax.workdir import CONFIG_FILE

  if not FLAGS["config"].present and (recorded := recorded_config(
      FLAGS.workdir, FLAGS["config"].override_values)) is not None:
    return recorded, f"{os.path.join(FLAGS.workdir, CONFIG_FILE)}, the run's own"
  return checked_config(FLAGS), FLAGS["config"].config_filename


def _set_up_jax(config) -> str:
  """Device count, compilation cache and distributed runtime: before JAX's backends start.

  -> why the CPU has the devices it has.
  """
  from vit_jax import host_cpu

  shares = tuple(config[k] for k in ("batch_size", "eval_batch_size") if k in config)
  why_devices = host_cpu.configure(FLAGS.cpu_devices, shares)
  import jax

  if FLAGS.compilation_cache_dir:
    cache = os.path.expanduser(FLAGS.compilation_cache_dir)
    from vit_jax.command_line import check_folder_flag

    check_folder_flag("compilation_cache_dir", cache)  # a file: JAX warns at every compile
    jax.config.update("jax_compilation_cache_dir", cache)
    # JAX's default keeps only compilations of a second or more; the evaluation step's
    # and the initialisation's fraction of a second add up at every start, too.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
  if FLAGS.distributed or FLAGS.coordinator_address:
    # Before anything else touches JAX's backends. On CPU, collectives go through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  return why_devices


def _print_result(result: dict, prefix: str = "") -> None:
  print(f"{prefix}test accuracy: {result['eval_accuracy']:.4f} (loss {result['eval_loss']:.4f}, "
        f"step {result['step']})")


def _train(config) -> None:
  import jax

  from vit_jax import train

  result = train.train_and_evaluate(config, FLAGS.workdir)
  # Every process prints its result, so that they can be compared.
  _print_result(result, f"process {jax.process_index()}: " if jax.process_count() > 1 else "")


def _evaluate(config) -> None:
  from vit_jax import inference

  _print_result(inference.evaluate_checkpoint(config, FLAGS.workdir))


def _visualize(config) -> None:
  from vit_jax import visualize

  for path in visualize.visualize_checkpoint(config, FLAGS.workdir, _num_images(4),
                                             out_dir=_output_dir("visualize")):
    print(f"wrote {path}")


def _predict(config) -> None:
  import numpy as np

  from vit_jax import image_files, inference

  if not FLAGS.images:
    raise ValueError("--mode=predict needs --images=FILE[,FILE...]")
  if not all(path.strip() for path in FLAGS.images):
    raise ValueError(f"--images={','.join(FLAGS.images)} has an empty file name (a stray comma?)")
  size = config.model.image_size
  images = np.stack([image_files.load_image(p, size) for p in FLAGS.images])
  probabilities = inference.predict(config, FLAGS.workdir, images)
  for path, probs in zip(FLAGS.images, probabilities, strict=True):
    shown = " ".join(f"{p:.3f}" for p in probs)
    print(f"{path}: digit {int(np.argmax(probs))} (p={probs.max():.3f}) probabilities [{shown}]")


SHIPPED_MARKER = "SHIPPED"  # in a shipped run's folder (pretrained/...): write nothing there
SEEDS_GROUP_MARKER = "seeds.json"  # `vit_jax.seeds.SEEDS_FILE`: seeds trained as one


def _num_images(default: int) -> int:
  return default if FLAGS.num_images is None else FLAGS.num_images  # 0 is refused, not 4


def _output_dir(kind: str) -> str | None:
  """--output_dir, or for a shipped run runs/<its name>/<kind>; None: inside the workdir."""
  if FLAGS.output_dir:
    from vit_jax.command_line import check_folder_flag

    check_folder_flag("output_dir", FLAGS.output_dir)
    return FLAGS.output_dir
  if _is_shipped():
    return os.path.join("runs", os.path.basename(os.path.abspath(FLAGS.workdir)), kind)
  return None


def _is_shipped() -> bool:
  return os.path.exists(os.path.join(FLAGS.workdir, SHIPPED_MARKER))


def _export(config) -> None:
  from vit_jax import export

  print(f"wrote {export.export_saved_model(config, FLAGS.workdir, _output_dir('saved_model'))}")


def _analyze(config) -> None:
  from vit_jax import analyze

  for path in analyze.analyze_checkpoint(config, FLAGS.workdir, _num_images(1000),
                                         _output_dir("analysis"), ablations=(FLAGS.ablation,)):
    print(f"wrote {path}")


MODES = {"train": _train, "eval": _evaluate, "predict": _predict, "visualize": _visualize,
         "export": _export, "analyze": _analyze}


# The modes each mode-specific flag serves: given to another mode, it would do nothing.
FLAG_MODES = {"images": ("predict",), "num_images": ("visualize", "analyze"),
              "output_dir": ("visualize", "export", "analyze"), "ablation": ("analyze",)}


def _refuse_flags_that_would_do_nothing() -> None:
  if not FLAGS.workdir.strip():  # "" would be the current folder: a run in the checkout
    raise ValueError(f"--workdir={FLAGS.workdir!r} names no folder")
  for name, modes in FLAG_MODES.items():
    if FLAGS[name].present and FLAGS.mode not in modes:
      raise ValueError(f"--{name} is for --mode={' or '.join(modes)}, not --mode={FLAGS.mode}")
  for name in ("num_processes", "process_id"):
    if FLAGS[name].present and not (FLAGS.distributed or FLAGS.coordinator_address):
      raise ValueError(f"--{name} is for a run of several processes: add "
                       "--coordinator_address or --distributed")
  if FLAGS.mode == "train" and os.path.exists(os.path.join(FLAGS.workdir, SEEDS_GROUP_MARKER)):
    raise ValueError(f"workdir={FLAGS.workdir!r} holds seeds trained as one step (its "
                     f"{SEEDS_GROUP_MARKER} lists them), not one run: resume them with "
                     "experiments/sweep_heads.py --vmap_seeds on the sweep's root")
  if FLAGS.mode == "train" and _is_shipped():
    raise ValueError(f"workdir={FLAGS.workdir!r} is a shipped run (its {SHIPPED_MARKER} file "
                     "says so) and is not trained further: train in another workdir, e.g. "
                     f"with --config.init_from={FLAGS.workdir}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  _refuse_flags_that_would_do_nothing()
  from vit_jax.command_line import keep_the_console_for_ours

  keep_the_console_for_ours()
  config, source = _config_of_this_command()
  why_devices = _set_up_jax(config)
  import jax

  from vit_jax.experiment_config import validate

  config = validate(config)
  if jax.process_index() == 0:
    about = f" ({why_devices})" if jax.default_backend() == "cpu" else ""
    print(f"config: {source}\ndevices: {jax.devices()}{about}", flush=True)
  MODES[FLAGS.mode](config)


def run():
  from vit_jax.command_line import run_command

  def define_config():
    # Defined here, not at import: without --config, defining it loads the default file and
    # applies the `--config.x=...` flags at once, and a misspelled key must be one line too.
    config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Experiment config file. Without it, a workdir "
        "that holds a run takes the run's own (WORKDIR/config.json), a new one "
        "experiments/mnist.py.", lock_config=True)

  run_command(define_config, main)


if __name__ == "__main__":
  run()
