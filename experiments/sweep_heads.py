"""Sweep the number of heads, and ablate the learned Q/K/V projections.

    python experiments/sweep_heads.py --root=runs/sweep                   # heads 1..16, 3 seeds
    python experiments/sweep_heads.py --root=runs/sweep --qkv=fused,identity   # + the ablation
    python experiments/sweep_heads.py --root=runs/sweep --qkv=tied_qk,identity_v,low_rank:2
    python experiments/sweep_heads.py --root=runs/sweep_hs --fixed=head_dim    # width grows
    python experiments/sweep_heads.py --root=runs/sweep --config.num_epochs=1  # any override
    python experiments/sweep_heads.py --root=runs/sweep --vmap_seeds   # a setting's seeds as one
    python experiments/sweep_heads.py --root=runs/sweep --analyze=zero,mean  # both ablations

Runs go through the same `train_and_evaluate` as launch.py, one workdir each under
--root. Rerunning skips finished runs and resumes interrupted ones. Several processes may
share one --root (one per host or GPU, a SLURM job array): each takes the next run that is
neither finished nor held by another. Each finished run is analyzed as `launch.py
--mode=analyze` does (into its workdir's analysis/; --analyze= for none). The tables, the
paired differences, the gathered analyses and the plot are written to --root by the process
that finds every run finished, or by --report_only.
"""

import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FLAGS = flags.FLAGS
flags.DEFINE_string("root", None, "Folder holding one workdir per run, and the reports.",
                    required=True)
flags.DEFINE_list("heads", ["1", "2", "4", "8", "16"], "Head counts.")
flags.DEFINE_integer("seeds", 3, "Seeds per setting: 0 .. seeds-1.", lower_bound=1)
flags.DEFINE_list("qkv", ["fused"], "Projection modes (model.qkv): fused, separate, identity, "
                  "identity_q, identity_k, identity_v, tied_qk, frozen_random, low_rank:R.")
flags.DEFINE_string("cpu_devices", "auto", "Split the CPU into this many JAX devices, as "
                    "launch.py does ('auto': one per core).")
flags.DEFINE_bool("report_only", False, "Train nothing: write the reports from the runs "
                  "finished under --root (all of them must be).")
flags.DEFINE_bool("vmap_seeds", False, "Train each setting's seeds as one compiled step "
                  "(vit_jax.seeds: jax.vmap over their stacked states), the same results up to "
                  "float rounding; off by default: docs/performance.md measures it on CPUs "
                  "and an H200.")
flags.DEFINE_list("analyze", ["zero"], "Analyze each finished run (vit_jax.analyze) with these "
                  "head ablations: zero, mean; empty: no analysis.")
flags.DEFINE_integer("analysis_images", 1000, "Test images each run's analysis measures.",
                     lower_bound=1)
flags.DEFINE_enum("fixed", "width", ["width", "head_dim"],
                  "Keep the width (head dim = width / heads) or the head dim.")


def main(argv):
  del argv
  _refuse_a_root_that_is_no_folder()
  _refuse_or_note_flags_that_do_nothing()
  from vit_jax import host_cpu
  from vit_jax.command_line import checked_config, keep_the_console_for_ours

  keep_the_console_for_ours()
  config = checked_config(FLAGS)
  host_cpu.configure(FLAGS.cpu_devices, (config.batch_size, config.eval_batch_size))
  from vit_jax import sweep, sweep_report, train
  from vit_jax.analyze import check_ablations
  from vit_jax.experiment_config import validate

  check_ablations(FLAGS.analyze, "--analyze")  # before the data loads: a typo costs nothing
  base = validate(config)
  runs = sweep.plan(base, _head_counts(), range(FLAGS.seeds), FLAGS.qkv, FLAGS.fixed)
  data = None if FLAGS.report_only else train.load_data(base)
  records = sweep.run_all(runs, Path(FLAGS.root), data, vmap_seeds=FLAGS.vmap_seeds,
                          after_run=_analyzer(data) if FLAGS.analyze else None)
  if len(records) < len(runs):  # what the other processes finished meanwhile
    records = sweep.run_all(runs, Path(FLAGS.root), None, say=lambda _: None)
  if len(records) < len(runs) and FLAGS.report_only:  # asked for a report, and none is due
    raise ValueError(f"--report_only: {len(runs) - len(records)} of {len(runs)} runs under "
                     f"--root={FLAGS.root} are not finished; no reports written")
  if len(records) < len(runs):  # others still train: the last process to finish reports
    print(f"{len(runs) - len(records)} of {len(runs)} runs are not finished (in other "
          "processes); no reports written yet")
    return
  for path in sweep_report.write_reports(records, Path(FLAGS.root)):
    print(f"wrote {path}")
  print((Path(FLAGS.root) / "summary.md").read_text())


# The --config.x fields the sweep sets in every run, and the flag that sets them.
SET_PER_RUN = {"seed": "--seeds=N (seeds 0 .. N-1)", "model.qkv": "--qkv",
               "model.qkv_rank": "--qkv=low_rank:R"}


def _refuse_a_root_that_is_no_folder() -> None:
  from vit_jax.command_line import check_folder_flag

  check_folder_flag("root", FLAGS.root)
  if FLAGS.report_only and not Path(FLAGS.root).exists():
    raise ValueError(f"--report_only: --root={FLAGS.root!r} does not exist")


def _refuse_or_note_flags_that_do_nothing() -> None:
  set_per_run = {**SET_PER_RUN, **({"model.num_heads": "--heads"} if FLAGS.fixed == "width"
                                   else {})}  # with --fixed=head_dim it sets the head dim
  for key in FLAGS["config"].override_values:
    if key in set_per_run:
      raise ValueError(f"--config.{key} is set in every run by the sweep: use "
                       f"{set_per_run[key]}")
  if FLAGS.report_only:  # the sweep's own command with --report_only added stays valid
    unused = [f"--{name}" for name in ("analyze", "analysis_images", "vmap_seeds")
              if FLAGS[name].present and FLAGS[name].value]  # --analyze= turns nothing on
    if unused:
      print(f"note: --report_only trains and analyzes nothing; not used: {', '.join(unused)}",
            flush=True)
  if FLAGS["analysis_images"].present and not FLAGS.analyze:
    raise ValueError("--analysis_images is for the runs' analysis, which --analyze= turns off")


def _head_counts() -> list[int]:
  try:
    return [int(h) for h in FLAGS.heads]
  except ValueError:
    raise ValueError(f"--heads={','.join(FLAGS.heads)} must be whole numbers, e.g. "
                     "--heads=1,2,4") from None


def _analyzer(data):
  """-> after_run(config, workdir): the run's analysis, for each --analyze ablation not done."""
  from vit_jax import analyze

  def after_run(config, workdir):
    left = tuple(a for a in FLAGS.analyze  # redone where it measured another image count
                 if not analyze.is_done(workdir / "analysis", a, FLAGS.analysis_images))
    if left:
      analyze.analyze_checkpoint(config, workdir, FLAGS.analysis_images,
                                 test_data=data["test"], ablations=left)

  return after_run


if __name__ == "__main__":
  from vit_jax.command_line import run_command

  def define_config():  # a misspelt --config.x then ends in one line (launch.run)
    config_flags.DEFINE_config_file(
        "config", str(Path(__file__).resolve().parent / "sweep_small.py"),
        "Base experiment config; qkv, seed and (with --fixed=width) heads are set per "
        "run, and their --config.x flags refused; with --fixed=head_dim, the width is "
        "set per run and model.num_heads x hidden_size choose the head dim.",
        lock_config=True)

  run_command(define_config, main)
