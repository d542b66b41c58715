"""The base of the head-count sweep: small enough for 30 runs on 2 cores (5 head counts x
3 seeds x 2 projection modes).

Width 64 and 7x7 patches (16 tokens), 4 layers, 2 epochs of full MNIST.
"""

from vit_jax.experiment_config import ExperimentConfig, as_config_dict
from vit_jax.model_configs import get_model_config


def get_config():
  return as_config_dict(ExperimentConfig(
      model=get_model_config("testing", hidden_size=64, num_layers=4, num_heads=4,
                             mlp_dim=128),
      batch_size=128,
      num_epochs=2,
      learning_rate=3e-3,
      warmup_steps=100,
      augment_max_shift=1,
      log_every_steps=50,
      checkpoint_every_steps=200,
  ))
