"""Fashion-MNIST with the `seed` ViT: harder images, the same pipeline, a longer recipe.

    sudo apt-get install -y dataset-fashion-mnist   # offline source of the IDX files
    python launch.py --config=experiments/fashion_mnist.py --workdir=runs/fashion

15 epochs with random shifts, random erasing (the classic regulariser for Fashion-MNIST) and
label smoothing; 5,000 training images held out to watch. The README's results table has
what it reached over three seeds.
"""

from vit_jax.experiment_config import ExperimentConfig, as_config_dict
from vit_jax.model_configs import get_model_config


def get_config():
  return as_config_dict(ExperimentConfig(
      model=get_model_config("seed", attention_kernel="auto"),
      dataset="fashion_mnist",
      validation_examples=5000,
      batch_size=128,
      microbatch_size="auto",  # cache-sized on a CPU (16 here), the whole share on a GPU
      eval_batch_size=128,
      num_epochs=15,
      learning_rate=2e-3,
      augment_max_shift=2,
      random_erasing=0.25,
      label_smoothing=0.1,
      eval_every_steps=859,  # every two epochs of the 55,000 left for training
      log_every_steps=200,
  ))
