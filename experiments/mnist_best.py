"""The long recipe for accuracy: the `best` ViT with overlapping patches, 36 epochs, EMA.

    python launch.py --config=experiments/mnist_best.py --workdir=runs/mnist_best
    python launch.py --config=experiments/mnist_best.py --workdir=runs/mnist_best_s1 \
        --config.seed=1

The seed's 4x4 patch grid and depth at twice its width (808,970 parameters), each patch
reaching 2 pixels into its neighbours (8x8 windows on the 4x4 grid: still 49 tokens), trained
four times as long as `experiments/mnist.py` with random affine maps on top of the shifts
(the last 6 epochs with the shifts only, on digits like the evaluated ones) and a moving
average of the parameters for evaluation, which averages each image's class probabilities
over its 9 shifts by up to a pixel (test-time augmentation). Each of those was
kept on validation accuracy (docs/performance.md, "The long recipe"). The test split is read
once, at the end; the 5,000 held-out training images are evaluated every sixth epoch. About
30 minutes a run at 1,185 training images/s on the faster of this project's 2-core AMD EPYC
machines, about 50 at 720 on the slower; the README's results table has what it reached.

Distilled: after the file's name, the path of a teachers' file (`experiments/teacher_targets.py`
writes it from trained runs) makes each training target half the label and half the
teachers' mean class probabilities (`vit_jax/distillation.py`); the same model learns, the
teachers are only read. docs/performance.md ("The long recipe") has the four teachers'
commands, and the README's results table what the distilled recipe reached:

    python launch.py --config=experiments/mnist_best.py:runs/teachers4.npz \
        --workdir=runs/mnist_best_distilled
"""

from vit_jax.experiment_config import ExperimentConfig, as_config_dict
from vit_jax.model_configs import get_model_config

DISTILL_WEIGHT = 0.5  # the teachers' share of each target: the one tried, kept on validation


def get_config(teachers: str | None = None):
  """The recipe; with `teachers` (what follows `mnist_best.py:` in --config), distilled."""
  if teachers is not None and not teachers.strip():
    raise ValueError(f"teachers={teachers!r} (after 'mnist_best.py:') names no file")
  return as_config_dict(ExperimentConfig(
      model=get_model_config("best", patch_overlap=2, attention_kernel="auto",
                             compute_dtype="auto"),
      dataset="mnist",
      validation_examples=5000,
      batch_size=128,
      microbatch_size="auto",
      eval_batch_size=128,
      num_epochs=36,
      learning_rate=1.5e-3,
      warmup_steps=430,  # about one epoch of the 55,000 (429 steps)
      weight_decay=0.05,
      augment_max_shift=2,
      augment_max_rotation=10.0,
      augment_max_scale=0.1,
      augment_max_shear=5.0,
      undistorted_final_epochs=6,  # the last 6 without the affine maps: shifts only
      ema_decay=0.9995,
      eval_max_shift=1,  # each evaluated image averaged over its 9 shifts by up to 1 pixel
      eval_every_steps=2580,  # about every sixth epoch: the held-out accuracy as it climbs
      checkpoint_every_steps=1290,
      distill_targets=teachers,
      distill_weight=DISTILL_WEIGHT if teachers else 0.0,
  ))
