"""The base of the converged head-count study, meant to reach >= 98.5 % at 4 heads.

    python experiments/sweep_heads.py --config=experiments/study.py --root=runs/study/width \
        --qkv=fused,identity,tied_qk,identity_v --analyze=zero,mean
    python experiments/sweep_heads.py --config=experiments/study.py --root=runs/study/head_dim \
        --qkv=fused,identity,tied_qk,identity_v --analyze=zero,mean --fixed=head_dim \
        --config.model.num_heads=8

The first keeps the width at 64 (head size 64 / heads); the second keeps the head size at 8
(64 / the base's 8 heads; width 8 x heads, 8 to 128), so its 8-head runs are the first's
(symlink `runs/study/width/*_h8_w64_s*` into its root before it starts to skip training them
again). The README's study sections have what both reached.

The `sprint` shape (7x7 patches: 16 tokens and the class token, width 64, depth 4, MLP
128), as `experiments/mnist_sprint.py` trains it (about 98.4-98.8 % after 8 epochs), for 10
epochs with shifts of up to 1 pixel; 5,000 training images held out, so the study's choices
can be made on them and the test split read once per run.
"""

from vit_jax.experiment_config import ExperimentConfig, as_config_dict
from vit_jax.model_configs import get_model_config


def get_config():
  return as_config_dict(ExperimentConfig(
      model=get_model_config("sprint", attention_kernel="auto", compute_dtype="auto"),
      validation_examples=5000,
      batch_size=128,
      microbatch_size="auto",
      eval_batch_size=256,
      num_epochs=10,
      learning_rate=3e-3,
      warmup_steps=100,
      augment_max_shift=1,
      eval_every_steps=0,
      log_every_steps=100,
      checkpoint_every_steps=1000,
  ))
