#!/usr/bin/env bash
# Prepares, on this project's CPU machines, what experiments/gpu_benchmark.sh needs on a lent
# GPU machine that has JAX, Flax, Optax, Orbax, chex and TensorBoard but neither this
# project's packages nor the internet (the H200 image: Python 3.12, no TensorFlow):
#
#   .whl/        wheels of the packages missing there: ml_collections, and tensorflow-datasets
#                with the few of its needs that reading a prepared dataset imports (the
#                versions of constraints.txt);
#   .gpu_tfds/   TFDS's MNIST, prepared: its metadata and the decoded arrays, compressed
#                (12 MB). TFDS reads them without TensorFlow, so the time-to-accuracy run works
#                there; the TFRecord files stay behind.
#
#   bash experiments/gpu_prepare.sh        # then, on the GPU machine, with both carried:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site \
#       && bash experiments/gpu_benchmark.sh "$OUT"
#
# Both folders are git-ignored. Environment, optional: PYTHON (default .venv/bin/python, the
# project's environment, which builds MNIST from the IDX files if needed), TFDS_DATA_DIR
# (default: TFDS's), GPU_TFDS (where to write the dataset, default .gpu_tfds), WHEELS=0 (skip
# the wheels), GPU_PYTHON_VERSION (default 3.12).
set -euo pipefail
gpu_tfds="$(realpath -m "${GPU_TFDS:-$(dirname "$0")/../.gpu_tfds}")"  # before the cd
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"

if [[ "${WHEELS:-1}" != 0 ]]; then
  rm -rf .whl && mkdir .whl
  pinned() { grep -i "^$1==" constraints.txt; }
  # The platforms pip may take a compiled wheel for; these are all pure Python today.
  platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
             --platform manylinux2014_x86_64)
  for name in ml_collections tensorflow-datasets tensorflow-metadata toml immutabledict; do
    "$python" -m pip download --quiet --no-deps --only-binary=:all: \
      --python-version "${GPU_PYTHON_VERSION:-3.12}" --implementation cp "${platforms[@]}" \
      -d .whl "$(pinned "$name")"
  done
  # promise is published as source only; its wheel is pure Python.
  "$python" -m pip wheel --quiet --no-deps -w .whl "$(pinned promise)"
  ls .whl
fi

"$python" - "${TFDS_DATA_DIR:-}" "$gpu_tfds" <<'EOF'
import shutil
import sys
from pathlib import Path

import numpy as np

from vit_jax import mnist_source

data_dir, out = sys.argv[1] or None, Path(sys.argv[2])
prepared = mnist_source.builder("mnist", data_dir)
source = Path(str(prepared.data_dir))
target = out / source.relative_to(Path(str(prepared.data_dir_root)))
shutil.rmtree(target, ignore_errors=True)
target.mkdir(parents=True)
for name in ("dataset_info.json", "features.json"):
  shutil.copy(source / name, target / name)
for split in mnist_source.dataset_spec("mnist").num_examples:
  images, labels = mnist_source.load_split("mnist", split, data_dir)
  np.savez_compressed(target / f"{split}.arrays.npz", images=images, labels=labels)
print(f"wrote {target}")
EOF
