"""A smoke run: a small ViT on 8,192 MNIST images, for when a minute is all there is.

    python launch.py --config=experiments/tiny.py --workdir=runs/tiny

Patches of 7x7 make 16 tokens, so a step is cheap; past 90 % test accuracy (a test holds it
to that).
"""

from vit_jax.experiment_config import ExperimentConfig, as_config_dict
from vit_jax.model_configs import get_model_config


def get_config():
  return as_config_dict(ExperimentConfig(
      model=get_model_config("testing", hidden_size=64, num_layers=2, num_heads=4,
                             mlp_dim=128),
      train_examples=8192,
      batch_size=128,
      num_epochs=8,
      learning_rate=3e-3,
      warmup_steps=50,
      augment_max_shift=1,
      log_every_steps=16,
      checkpoint_every_steps=128,
  ))
