"""A faster recipe for time to accuracy: 7x7 patches (16 tokens), a wider, shallower ViT.

    python launch.py --config=experiments/mnist_fast.py --workdir=runs/fast --cpu_devices=2
    python -m vit_jax.benchmark --config=experiments/mnist_fast.py --time_to_accuracy=0.98,0.99

Sixteen tokens instead of 49 make attention and every projection about three times cheaper
per image than the `seed` shape; docs/performance.md records what it reached.
"""

from vit_jax.experiment_config import ExperimentConfig, as_config_dict
from vit_jax.model_configs import get_model_config


def get_config():
  return as_config_dict(ExperimentConfig(
      model=get_model_config("fast"),
      batch_size=128,
      microbatch_size="auto",  # cache-sized on a CPU (16 here), the whole share on a GPU
      eval_batch_size=1000,  # in cache-sized passes on a CPU, as experiments/mnist.py
      num_epochs=12,
      learning_rate=2e-3,
      warmup_steps=200,
      augment_max_shift=2,
      eval_every_steps=468,  # about once an epoch
      log_every_steps=100,
      checkpoint_every_steps=1000,
  ))
