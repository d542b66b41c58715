"""Default experiment: the `seed` ViT (width 64, 4 heads of 16, depth 6) on MNIST.

    python launch.py --config=experiments/mnist.py --workdir=runs/mnist

Every field and its default is documented in `vit_jax/experiment_config.py`;
this file states only what the experiment chooses.
"""

from vit_jax.experiment_config import ExperimentConfig, as_config_dict
from vit_jax.model_configs import get_model_config


def get_config():
  return as_config_dict(ExperimentConfig(
      # Chosen for the machine when the run starts (vit_jax/auto.py): bfloat16 products
      # where the hardware multiplies bfloat16, and the einsum path (the pure functions)
      # unless the fused CPU kernel measures faster here: the same maths.
      model=get_model_config("seed", attention_kernel="auto", compute_dtype="auto"),
      dataset="mnist",
      # 5,000 training images held out: the recipe was chosen on them (docs/performance.md,
      # "Levers for accuracy"); the test split is evaluated once, at the end.
      validation_examples=5000,
      batch_size=128,
      # Cache-sized micro-batches on a CPU (16 examples here), the whole share on a GPU.
      # Evaluation goes in cache-sized passes too (vit_jax/auto.py), so its batches can be
      # large: 1,000 divides both held-out splits, and measured 1.20x batches of 128 on an
      # AVX2 CPU (docs/performance.md, "Evaluation in cache-sized passes").
      microbatch_size="auto",
      eval_batch_size=1000,
      num_epochs=9,
      learning_rate=2e-3,
      eval_every_steps=429,  # once an epoch of the 55,000 left for training
  ))
