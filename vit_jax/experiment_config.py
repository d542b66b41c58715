"""The schema of a training run's config, checked once before anything runs.

Experiment files in `experiments/` return ml_collections ConfigDicts; `validate`
turns one into a frozen `ExperimentConfig`, rejecting unknown keys, wrong types
and impossible values with a one-line ValueError naming the key and value.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal

from vit_jax.model_configs import ModelConfig
from vit_jax.schema import check_types, from_mapping, require

# The augmentations that `undistorted_final_epochs` turns off (shifts and flips stay).
DISTORTIONS = ("augment_max_rotation", "augment_max_scale", "augment_max_shear",
               "augment_elastic_alpha", "random_erasing", "mixup_alpha", "cutmix_alpha")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything a run needs. Steps count optimizer updates of one global batch."""
  model: ModelConfig
  dataset: Literal["mnist", "fashion_mnist"] = "mnist"
  # TFDS data dir (None: TFDS's default). idx_dir: a folder of the four IDX files to
  # build the TFDS dataset from offline; 'auto' looks in the known places; None downloads.
  tfds_data_dir: str | None = None
  idx_dir: str | None = "auto"
  # Train on the first N training examples only (None: all 60,000 less the validation set).
  train_examples: int | None = None
  # Fine-tuning: the first parameters (the evaluated ones: the moving average, where kept)
  # are taken from the run in this workdir (`vit_jax.init_from`). The classifier head is
  # re-initialised where the classes differ, or everywhere with reinit_head; another patch
  # size resamples the position embeddings and the patch projection. None: from `seed`.
  init_from: str | None = None
  reinit_head: bool = False
  # Training examples held out for validation: the same fixed choice in every run, whatever
  # the seed (`input_pipeline.hold_out`). Evaluations during training then report validation
  # loss and accuracy, and the test split is evaluated at the end only. 0: none held out, and
  # evaluations during training use the test split (fine for watching, not for choosing).
  validation_examples: int = 0
  # The parameters' initialisation, the data order, the augmentation and dropout all
  # derive from (seed, step).
  seed: int = 0
  # The global batch: one optimizer update, shared by all devices.
  batch_size: int = 128
  # Training examples per device in one forward and backward (a micro-batch). None, or a
  # value not less than a device's share of the batch: the whole share at once; otherwise
  # it must divide batch_size / devices. Smaller micro-batches keep the activations in CPU
  # caches; the step sums their gradients (lax.scan), so the update is the same up to float
  # rounding (with dropout, each micro-batch draws its own masks). A flag cannot write
  # None: `--config.microbatch_size=<batch_size>` gives one micro-batch of the whole share.
  # 'auto' is chosen when a run starts (`vit_jax.auto`): cache-sized on a CPU, the whole
  # share on a GPU or TPU.
  microbatch_size: int | Literal["auto"] | None = None
  # Training steps per compiled call: the loop hands the devices this many steps' batches at
  # once and they run them in a loop of their own (`steps.compile_train_steps`), a call ending
  # early where the run logs, evaluates or checkpoints. The same updates as one step a call;
  # fewer calls, less of the host's time between steps (docs/performance.md, "Steps per call").
  steps_per_call: int = 10
  # Passes over the training set (fractions allowed); the steps are rounded up.
  num_epochs: float = 5.0
  # AdamW's peak learning rate, reached by a linear warm-up over warmup_steps (at most the
  # run's steps less one) and then decayed to 0 along a cosine by the last step.
  # weight_decay is AdamW's decoupled decay.
  learning_rate: float = 1e-3
  warmup_steps: int = 200
  weight_decay: float = 0.05
  # The gradient is rescaled to this global norm when larger.
  grad_clip_norm: float = 1.0
  # The share of each one-hot target spread evenly over the classes.
  label_smoothing: float = 0.0
  # Knowledge distillation: a share distill_weight of each training target is a teacher's
  # class probabilities for the example, read from distill_targets, a file of trained runs'
  # probabilities for every training image (`vit_jax.distillation`). 0: the labels alone.
  distill_targets: str | None = None
  distill_weight: float = 0.0
  # An exponential moving average of the parameters, decaying by this factor a step, is kept
  # beside them, saved in the checkpoints and used for every evaluation and prediction
  # (`train_state.EmaTrainState`). 0: none.
  ema_decay: float = 0.0
  # Random translation of up to this many pixels in each direction (0: none).
  augment_max_shift: int = 2
  # A random affine map per example (`augment.random_affine`): a rotation and a horizontal
  # shear of up to these many degrees either way, a scale within 1 +- augment_max_scale.
  augment_max_rotation: float = 0.0
  augment_max_scale: float = 0.0
  augment_max_shear: float = 0.0
  # Elastic distortion (`augment.random_elastic`): a smooth random displacement field, its
  # noise blurred by a Gaussian of augment_elastic_sigma pixels and scaled by
  # augment_elastic_alpha (0: none; Simard et al. used 34 and 4 on MNIST).
  augment_elastic_alpha: float = 0.0
  augment_elastic_sigma: float = 4.0
  # The chance that an example has one random rectangle (2-20 % of it) zeroed
  # (`augment.random_erasing`).
  random_erasing: float = 0.0
  # The chance of mirroring an image left to right (`augment.random_flip`): for clothes only;
  # refused for MNIST, where a mirrored digit is another digit or none.
  augment_flip: float = 0.0
  # Each training image mixed with another of its batch, and its target with that one's label
  # (`augment.random_mix`): mixup blends the two images, CutMix pastes a box of the other; the
  # share comes from Beta(alpha, alpha) (small alphas: mostly one image). 0: off; with both
  # on, each example takes one of the two with equal chance.
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  # The last this many epochs train without the distortions (the affine maps, elastic
  # distortion, random erasing and the mixing; the shifts and flips stay), on images like the
  # evaluated ones (`training_images`). 0: the distortions throughout. Nothing changes where
  # no distortion is on, or where the epochs round to no step.
  undistorted_final_epochs: float = 0.0
  # Test-time augmentation: evaluation (validation, test, `--mode=eval`) and prediction
  # average each image's class probabilities over its shifts by up to this many pixels in
  # each direction, (2 eval_max_shift + 1)^2 views (`input_pipeline.shifted_views`). 0: the
  # image alone.
  eval_max_shift: int = 0
  # Test-time flips: evaluation and prediction average each view with its mirror image too
  # (`input_pipeline.evaluation_views`). For clothes only, as `augment_flip`.
  eval_flip: bool = False
  # Images per evaluation batch (test and validation), shared by all devices.
  eval_batch_size: int = 1000
  # 'auto' uses pmap when JAX sees more than one device, else jit; 'shard' is
  # jit over a device mesh with the batch sharded (see vit_jax/parallel.py).
  parallel: Literal["auto", "jit", "pmap", "shard"] = "auto"
  # Training loss, accuracy and images/s are logged every log_every_steps steps.
  log_every_steps: int = 50
  # 0: evaluate at the end only.
  eval_every_steps: int = 0
  # A checkpoint every checkpoint_every_steps steps and at the end; the newest
  # keep_checkpoints stay.
  checkpoint_every_steps: int = 500
  keep_checkpoints: int = 3

  def __post_init__(self):
    if isinstance(self.microbatch_size, str) and self.microbatch_size.isdigit():
      # A flag over the field 'auto' writes its number as a string.
      object.__setattr__(self, "microbatch_size", int(self.microbatch_size))
    check_types(self)
    self._check_schedule()
    self._check_augmentation()
    self._check_data()

  def _check_schedule(self):
    """Batches, steps, the optimizer and the loss."""
    for key in ("batch_size", "eval_batch_size", "steps_per_call", "log_every_steps",
                "checkpoint_every_steps", "keep_checkpoints"):
      value = getattr(self, key)
      require(value > 0, key, value, "must be positive")
    for key in ("warmup_steps", "eval_every_steps"):
      value = getattr(self, key)
      require(value >= 0, key, value, "must not be negative")
    require(self.microbatch_size in (None, "auto") or (
        isinstance(self.microbatch_size, int) and self.microbatch_size > 0),
            "microbatch_size", self.microbatch_size, "must be positive, None or 'auto'")
    for key in ("num_epochs", "learning_rate"):
      value = getattr(self, key)
      require(0 < value < math.inf, key, value, "must be positive and finite")
    require(0 <= self.weight_decay < math.inf, "weight_decay", self.weight_decay,
            "must be finite and not negative")
    # JAX's keys keep a seed's low 32 bits: 2**32 + 5 would start as seed 5.
    require(0 <= self.seed < 2**32, "seed", self.seed, "must be in [0, 2**32)")
    require(self.grad_clip_norm > 0, "grad_clip_norm", self.grad_clip_norm, "must be positive")
    require(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing,
            "must be in [0, 1)")
    require(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "must be in [0, 1)")
    require(0 <= self.distill_weight <= 1, "distill_weight", self.distill_weight,
            "must be in [0, 1]")
    require(bool(self.distill_weight) == (self.distill_targets is not None), "distill_weight",
            self.distill_weight, f"must be positive exactly where distill_targets is set (it "
            f"is {self.distill_targets!r})")
    require(not (self.distill_weight and (self.mixup_alpha or self.cutmix_alpha)),
            "distill_weight", self.distill_weight, "cannot be combined with mixup_alpha or "
            "cutmix_alpha (a mixed image would need both teachers' targets)")

  def _check_augmentation(self):
    """The distortions of training images and the views evaluation averages over."""
    require(0 <= self.augment_max_shift <= 14, "augment_max_shift", self.augment_max_shift,
            "must be in [0, 14] (half the 28-pixel image)")
    for key, top in (("augment_max_rotation", 180), ("augment_max_shear", 45),
                     ("augment_max_scale", 0.5), ("random_erasing", 1), ("augment_flip", 1),
                     ("augment_elastic_alpha", 100), ("eval_max_shift", 4),
                     ("mixup_alpha", 10), ("cutmix_alpha", 10)):
      require(0 <= getattr(self, key) <= top, key, getattr(self, key), f"must be in [0, {top}]")
    require(self.augment_flip == 0 or self.dataset != "mnist", "augment_flip",
            self.augment_flip, "must be 0 for mnist: a mirrored digit is another digit or none")
    require(not self.eval_flip or self.dataset != "mnist", "eval_flip", self.eval_flip,
            "must be False for mnist: a mirrored digit is another digit or none")
    require(0 <= self.undistorted_final_epochs <= self.num_epochs, "undistorted_final_epochs",
            self.undistorted_final_epochs, f"must be in [0, num_epochs={self.num_epochs}]")
    require(not self.undistorted_final_epochs or any(getattr(self, k) for k in DISTORTIONS),
            "undistorted_final_epochs", self.undistorted_final_epochs,
            f"must be 0 where no distortion is on (none of {', '.join(DISTORTIONS)}): it would "
            "turn nothing off")
    require(1 <= self.augment_elastic_sigma <= 10, "augment_elastic_sigma",
            self.augment_elastic_sigma, "must be in [1, 10] (pixels)")

  def _check_data(self):
    """The model's input against the dataset, and the split of its training examples."""
    # Both datasets are 28x28 grey images of 10 classes.
    for key, value in (("num_classes", 10), ("image_size", 28), ("num_channels", 1)):
      require(getattr(self.model, key) == value, f"model.{key}", getattr(self.model, key),
              f"does not fit {self.dataset}: its 28x28 grey images in 10 classes need {value}")
    require(self.train_examples is None or self.train_examples >= self.batch_size,
            "train_examples", self.train_examples,
            f"must be at least batch_size={self.batch_size}")
    require(self.init_from is None or self.init_from.strip(), "init_from", self.init_from,
            "must name a run's workdir (None: start from config.seed)")
    require(not self.reinit_head or self.init_from is not None, "reinit_head",
            self.reinit_head, "needs config.init_from (there is no head to keep otherwise)")
    require(self.validation_examples >= 0, "validation_examples", self.validation_examples,
            "must not be negative")
    left = 60000 - self.validation_examples
    require(left >= self.batch_size, "validation_examples", self.validation_examples,
            f"leaves fewer than batch_size={self.batch_size} of the 60000 training examples")
    require(self.train_examples is None or self.train_examples <= left,
            "train_examples", self.train_examples,
            f"exceeds the {left} training examples left beside "
            f"validation_examples={self.validation_examples}")


def validate(config: Any) -> ExperimentConfig:
  """ConfigDict or mapping -> ExperimentConfig, or a one-line ValueError."""
  return from_mapping(ExperimentConfig, config, path="config")


def as_config_dict(config: ExperimentConfig):
  """-> a locked ml_collections.ConfigDict holding every field, for `--config.x=y` flags.

  Fields that are None become typed placeholders, so that a flag can still set them.
  """
  import ml_collections
  from ml_collections.config_dict import placeholder

  def convert(obj):
    hints = typing.get_type_hints(type(obj))
    out = {}
    for field in dataclasses.fields(obj):
      value = getattr(obj, field.name)
      if dataclasses.is_dataclass(value):
        value = convert(value)
      elif _words_or_numbers(hints[field.name]):  # text, which `validate` parses: a flag
        value = placeholder(str) if value is None else str(value)  # may give 8 or 'auto'
      elif value is None:
        value = placeholder(_non_none_type(hints[field.name]))
      elif hints[field.name] is float:
        value = float(value)  # so that a flag may later set 2.5 where the file says 2
      out[field.name] = value
    return ml_collections.ConfigDict(out)

  config_dict = convert(config)
  config_dict.lock()
  return config_dict


def _words_or_numbers(annotation: Any) -> bool:
  """Whether a field takes an int or a word (`int | Literal['auto'] | None`)."""
  options = typing.get_args(annotation)
  return int in options and any(typing.get_origin(o) is Literal for o in options)


def _non_none_type(annotation: Any) -> type:
  return next(t for t in typing.get_args(annotation) if t is not type(None))
