"""How fast a config turns compute into accuracy, measured in one process.

    python -m vit_jax.benchmark --config=experiments/mnist.py --out=bench.json
    python -m vit_jax.benchmark --config=experiments/mnist.py --time_to_accuracy=0.98,0.99

Reports, for the config's model and global batch:
- the machine's matmul peak (a large matmul timed here, before every timed window) in the
  model's compute dtype: float32, or for mixed precision bfloat16 operands accumulating
  in float32;
- model FLOPs per training and per evaluation image, counted from the architecture
  and cross-checked against XLA's cost analysis of the compiled steps;
- training and evaluation images/s (median over timed windows after warm-up) and
  the share of the peak they achieve (MFU, against the median of the peak's probes);
- compile time of the training step, cold and from the persistent compilation cache;
- peak resident memory of the process, and the training step's peak on one device as
  XLA's buffer assignment plans it (the step alone: on an accelerator the process's
  device memory also holds the peak's probe);
- optionally, time to accuracy: wall time from starting `launch.py` until the validation
  accuracy (where the config holds images out, else the test accuracy) first reaches each
  target.
Speed goals live here, never in timed tests.
"""

from vit_jax.benchmark.flops import forward_flops, train_flops, xla_flops
from vit_jax.benchmark.report import run, table, time_to_accuracy
from vit_jax.benchmark.timing import MatmulPeak, peak_matmul_size

__all__ = ["MatmulPeak", "forward_flops", "peak_matmul_size", "run", "table",
           "time_to_accuracy", "train_flops", "xla_flops"]
