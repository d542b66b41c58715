"""The three-minute recipe: a small ViT in mixed precision for 8 epochs, aiming at 98 %.

    python launch.py --config=experiments/mnist_sprint.py --workdir=runs/sprint --cpu_devices=2

The registry's `sprint` shape (7x7 patches, width 64, depth 4: 138,250 parameters) with
bfloat16 products accumulating in float32 (where the hardware multiplies bfloat16; float32
elsewhere: `compute_dtype='auto'`) trains faster than `fast`, so a time budget holds more
epochs; without random shifts a short run learns faster.
docs/performance.md records what it reached over several seeds, and its predecessors.
"""

from vit_jax.experiment_config import ExperimentConfig, as_config_dict
from vit_jax.model_configs import get_model_config


def get_config():
  return as_config_dict(ExperimentConfig(
      model=get_model_config("sprint", compute_dtype="auto"),  # bfloat16 where it is fast
      batch_size=128,
      microbatch_size="auto",  # cache-sized on a CPU (32 here), the whole share on a GPU
      eval_batch_size=256,
      num_epochs=8,
      learning_rate=3e-3,
      warmup_steps=100,
      augment_max_shift=0,
      eval_every_steps=468,  # every epoch
      log_every_steps=100,
      checkpoint_every_steps=1000,
  ))
