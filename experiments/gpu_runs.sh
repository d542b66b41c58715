#!/usr/bin/env bash
# Several training runs at once on one lent accelerator, for recipe work that takes a 2-core
# CPU an hour a run: one run of the `best` ViT at batch 128 leaves a GPU mostly idle (its
# steps are many small kernels; docs/performance.md, "On an NVIDIA H200"), so they share it.
#
#   bash experiments/gpu_runs.sh RUNS_FILE [OUT_DIR]
#
# RUNS_FILE has one run a line, "NAME FLAG...", the flags as launch.py takes them, split at
# spaces (no quoting); NAME of letters, digits, '.', '_' and '-', each once. Blank lines and
# lines starting with '#' are skipped. E.g.
#   e48_s0 --config=experiments/mnist_best.py --config.num_epochs=48
# (experiments/gpu_runs_best48.txt is one such file.)
# Every run starts at once, in RUNS_DIR/NAME (default runs/gpu/NAME), with an equal share of
# the device's memory. At LIMIT_S seconds (default 480: with the 30 s a stopped run has to
# save, the archive and the wheels' install, it fits a lent machine's 600 s call) the
# unfinished ones get SIGTERM, which checkpoints and stops them (reported as "stopped at the
# limit", not as a failure); the same command resumes them while RUNS_DIR is still there.
# OUT_DIR (default: $OUT, else gpu_results) then gets runs.tgz, each run's config.json,
# metrics.jsonl and output (no checkpoints), and gpu_runs.log, each run's exit status and
# last evaluations.
#
# On a lent GPU machine, carry .whl and .gpu_tfds from experiments/gpu_prepare.sh and install
# the wheels as experiments/gpu_benchmark.sh's header says; runs read MNIST from .gpu_tfds
# where it exists, unless their line names a tfds_data_dir. It refuses to start unless JAX's
# default backend is a GPU or TPU (ALLOW_CPU=1 lets it run on a CPU, as its test does).
# Environment, optional: PYTHON (default python3), LIMIT_S, RUNS_DIR, GPU_TFDS (default
# .gpu_tfds).
set -euo pipefail
(( $# )) || { echo "usage: bash experiments/gpu_runs.sh RUNS_FILE [OUT_DIR]" >&2; exit 2; }
runs_file="$(realpath "$1")"  # before the cd: relative to the caller
out="$(realpath -m "${2:-${OUT:-gpu_results}}")"
gpu_tfds="$(realpath -m "${GPU_TFDS:-$(dirname "$0")/../.gpu_tfds}")"
runs="$(realpath -m "${RUNS_DIR:-$(dirname "$0")/../runs/gpu}")"
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
limit="${LIMIT_S:-480}"
export PYTHONUNBUFFERED=1  # a stopped run keeps its output
mkdir -p "$out" "$runs"

main() {
  echo "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  fi
  if [[ -z "${ALLOW_CPU:-}" ]] &&
     ! "$python" -c "import jax, sys; sys.exit(jax.default_backend() == 'cpu')"; then
    echo "== JAX sees no GPU or TPU (set ALLOW_CPU=1 to run on the CPU anyway)"
    return 1
  fi
  local lines names=() pids=()
  mapfile -t lines < <(grep -Ev '^[[:space:]]*(#|$)' "$runs_file" | tr -d '\r')
  (( ${#lines[@]} )) || { echo "== $runs_file names no run"; return 1; }
  local line words seen=" "
  for line in "${lines[@]}"; do  # every name checked before any run starts
    read -ra words <<<"$line"
    if [[ ! "${words[0]}" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ || "$seen" == *" ${words[0]} "* ]]; then
      echo "== run name '${words[0]}' in $runs_file: not letters, digits, '.', '_' and" \
           "'-', or named twice"
      return 1
    fi
    seen+="${words[0]} "
  done
  # Stopping this script stops the runs (each in timeout's own process group), which save.
  trap 'kill -TERM "${pids[@]}" 2>/dev/null' INT TERM
  # Each process's share of the device's memory: JAX takes 75 % of it by default, which
  # would leave the second run none.
  XLA_PYTHON_CLIENT_MEM_FRACTION="$(awk "BEGIN {print 0.9 / ${#lines[@]}}")"
  export XLA_PYTHON_CLIENT_MEM_FRACTION
  for line in "${lines[@]}"; do
    read -ra words <<<"$line"
    local name="${words[0]}" flags=("${words[@]:1}")
    if [[ -d "$gpu_tfds" && "$line" != *tfds_data_dir* ]]; then
      flags+=("--config.tfds_data_dir=$gpu_tfds")
    fi
    echo "== $name: ${flags[*]}"
    timeout -s TERM -k 30 "$limit" "$python" launch.py --workdir="$runs/$name" \
      "${flags[@]}" >>"$runs/$name.log" 2>&1 &
    names+=("$name") pids+=($!)
  done
  local i status failed=0
  for i in "${!pids[@]}"; do
    status=0
    wait "${pids[$i]}" || status=$?
    if (( status == 124 )); then
      echo "== ${names[$i]}: stopped at the limit (${limit} s); the same command resumes it"
    else
      (( status == 0 )) || failed=1
      echo "== ${names[$i]}: exit $status"
    fi
    echo "   its last evaluations and speed:"
    grep -E 'validation|test accuracy|img/s' "$runs/${names[$i]}.log" | tail -4 || true
  done
  if (cd "$runs" && tar czf "$out/runs.tgz" --ignore-failed-read -- \
      "${names[@]/%/.log}" "${names[@]/%//config.json}" "${names[@]/%//metrics.jsonl}" \
      2>/dev/null); then
    echo "== wrote $out/runs.tgz"
  else
    echo "== could not write $out/runs.tgz"
    failed=1
  fi
  return "$failed"
}

main 2>&1 | tee "$out/gpu_runs.log"
