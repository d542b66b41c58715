#!/usr/bin/env bash
# The Speed issue's accelerator measurements as one script: the `seed` config in mixed
# precision (bfloat16 products, float32 parameters) and in float32 (on NVIDIA GPUs JAX's
# default computes float32 products in TF32), at the issue's batch of 128 and at a batch
# large enough to fill a GPU; MFU against the peak measured in the same process and
# precision (an 8192-sided product on an accelerator; see vit_jax/benchmark/timing.py).
#
#   bash experiments/gpu_benchmark.sh [OUT_DIR]
#
# Writes one JSON per measurement and a log into OUT_DIR (default: $OUT, else gpu_results).
# A measurement that fails is reported and the others still run; the script then exits 1.
# It refuses to start unless JAX's default backend is a GPU or TPU (ALLOW_CPU=1 lets it run
# on a CPU, as its test does). Environment, all optional: CONFIG (default
# experiments/mnist.py), BATCHES (default "128 8192"), DTYPES (default "bfloat16 float32";
# either empty skips the step measurements, e.g. to rerun only the time to accuracy),
# WINDOWS (default 5), TTA_CONFIG (default experiments/mnist_fast.py: its time to 98 % and
# 99 % in mixed precision; empty skips it), TTA_FLAGS (more --config.x=y for that run, e.g.
# --config.idx_dir=DIR), GPU_TFDS (default .gpu_tfds: where that folder exists, the run
# reads MNIST from it unless TTA_FLAGS names a tfds_data_dir), PYTHON (default python3).
# Time to accuracy trains on real MNIST through TFDS: it is skipped where tensorflow-datasets
# is not importable, and it fails (reported at the end) where neither a prepared TFDS dir
# nor, with TensorFlow to build one, the IDX files are there.
#
# On a machine without this project's virtual environment (a lent H200 has JAX, Flax, Optax,
# Orbax, chex and TensorBoard, but neither ml_collections nor TensorFlow nor TFDS), run
# experiments/gpu_prepare.sh here first, carry the .whl and .gpu_tfds it writes, and there:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site \
#       && bash experiments/gpu_benchmark.sh "$OUT"
set -euo pipefail
out="$(realpath -m "${1:-${OUT:-gpu_results}}")"  # before the cd: relative to the caller
gpu_tfds="$(realpath -m "${GPU_TFDS:-$(dirname "$0")/../.gpu_tfds}")"
cd "$(dirname "$0")/.."
config="${CONFIG:-experiments/mnist.py}"
read -ra batches <<<"${BATCHES-128 8192}"
read -ra dtypes <<<"${DTYPES-bfloat16 float32}"
windows="${WINDOWS:-5}"
tta_config="${TTA_CONFIG-experiments/mnist_fast.py}"
read -ra tta_flags <<<"${TTA_FLAGS:-}"
if [[ -d "$gpu_tfds" && "${TTA_FLAGS:-}" != *tfds_data_dir* ]]; then
  tta_flags+=("--config.tfds_data_dir=$gpu_tfds")
fi
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1  # the log keeps its order, and a killed run keeps its output
mkdir -p "$out"

main() {
  echo "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  fi
  "$python" -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())"
  if [[ -z "${ALLOW_CPU:-}" ]] &&
     ! "$python" -c "import jax, sys; sys.exit(jax.default_backend() == 'cpu')"; then
    echo "== JAX sees no GPU or TPU (set ALLOW_CPU=1 to measure the CPU anyway)"
    return 1
  fi

  local failed=()
  for dtype in "${dtypes[@]}"; do
    for batch in "${batches[@]}"; do
      echo "== $config, $dtype, batch $batch"
      # One micro-batch per device and step, and evaluation batches as large as the training
      # batch: the CPU's micro-batches of 16 would leave an accelerator idle. (The config's
      # attention_kernel 'auto' takes the einsum path off CPUs by itself.)
      "$python" -m vit_jax.benchmark --config="$config" --config.model.compute_dtype="$dtype" \
        --config.batch_size="$batch" --config.microbatch_size="$batch" \
        --config.eval_batch_size="$batch" --windows="$windows" --nocompile_times \
        --out="$out/$(basename "$config" .py)_${dtype}_b${batch}.json" \
        || failed+=("$dtype batch $batch")
    done
  done

  if [[ -n "$tta_config" ]]; then
    if "$python" -c "import tensorflow_datasets" 2>/dev/null; then
      echo "== time to accuracy: $tta_config, bfloat16"
      "$python" -m vit_jax.benchmark --config="$tta_config" \
        --config.model.compute_dtype=bfloat16 --config.microbatch_size=128 \
        --config.eval_batch_size=1000 --eval_every_steps=234 --windows=2 --nocompile_times \
        --time_to_accuracy=0.98,0.99 "${tta_flags[@]}" \
        --out="$out/$(basename "$tta_config" .py)_bfloat16_time_to_accuracy.json" \
        || failed+=("time to accuracy")
    else
      echo "== time to accuracy skipped: tensorflow_datasets is not importable"
    fi
  fi
  if (( ${#failed[@]} )); then
    printf '== FAILED: %s\n' "${failed[@]}"
    return 1
  fi
  echo "== done: $out"
}

main 2>&1 | tee "$out/gpu_benchmark.log"
