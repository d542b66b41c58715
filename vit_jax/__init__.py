"""vit_jax: Vision Transformers on MNIST, with the attention maths in plain sight."""
