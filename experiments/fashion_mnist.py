"""Fashion-MNIST with the `seed` ViT: harder images, same pipeline.

    sudo apt-get install -y dataset-fashion-mnist   # offline source of the IDX files
    python launch.py --config=experiments/fashion_mnist.py --workdir=runs/fashion
"""

from vit_jax.experiment_config import ExperimentConfig, as_config_dict
from vit_jax.model_configs import get_model_config


def get_config():
  return as_config_dict(ExperimentConfig(
      model=get_model_config("seed", dropout_rate=0.1),
      dataset="fashion_mnist",
      batch_size=128,
      num_epochs=10,
      # Translations blur the garments' silhouettes less than they help digits.
      augment_max_shift=1,
      label_smoothing=0.1,
  ))
