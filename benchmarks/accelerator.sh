#!/usr/bin/env bash
# The accelerator measurements of docs/benchmarks.md: the three-step table against PyTorch
# (when a CUDA torch is installed) and the stage times of configs/cifar10_vgg19.py, float32
# and bfloat16, with TFLOP/s and MFU. Each part writes its log to OUT_DIR as it goes, has its
# own time limit (PART_TIMEOUT seconds, default 240) and does not stop the parts after it when
# it fails.
#
#   [PYTHON=...] [PART_TIMEOUT=...] benchmarks/accelerator.sh [OUT_DIR [PART ...]]
#
# OUT_DIR defaults to benchmark_results/. PARTs, run in the order given (default: all, in this
# order): devices compare_float32 compare_bfloat16 stages_float32 stages_bfloat16. A device
# lent with a per-command limit takes one or two parts per call, e.g.
#   benchmarks/accelerator.sh "$OUT" devices compare_float32
# PYTHON (default python3) must be an interpreter with jax (and torch for the comparison):
# name a virtual environment's python by its own path, not through a symlink elsewhere (a
# venv python reached through another folder's link starts without the venv's packages).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmark_results}
shift $(($# > 0 ? 1 : 0))
all_parts=(devices compare_float32 compare_bfloat16 stages_float32 stages_bfloat16)
parts=("$@")
((${#parts[@]})) || parts=("${all_parts[@]}")
for name in "${parts[@]}"; do
  if [[ " ${all_parts[*]} " != *" $name "* ]]; then
    echo "unknown part '$name': choose from ${all_parts[*]}" >&2
    exit 2
  fi
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# JAX and PyTorch share the GPU in compare.py: JAX takes less than its default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
py=${PYTHON:-python3}
failed=()

run_part() {  # run_part NAME COMMAND...: run it under the time limit, log to $out/NAME.log
  local name=$1
  shift
  echo "== $name: $*"
  if ! timeout -k 10 "${PART_TIMEOUT:-240}" "$@" 2>&1 | tee "$out/$name.log"; then
    failed+=("$name")
  fi
}

torch_flag() {  # --no_torch unless PYTHON's torch sees a CUDA device
  if ! timeout 120 "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
      >/dev/null 2>&1; then
    echo --no_torch
  fi
}

for name in "${parts[@]}"; do
  dtype=${name#*_}
  case $name in
    devices)
      run_part devices "$py" -c '
import importlib.metadata as metadata
import jax
print(jax.devices())
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections", "torch"):
  try:
    print(name, metadata.version(name))
  except metadata.PackageNotFoundError:
    print(name, "not installed")' ;;
    compare_*)
      # shellcheck disable=SC2046  # torch_flag prints nothing or one word
      run_part "$name" "$py" -m benchmarks.compare --models vgg19,resnet18 --batch_size 128 \
        --dtype "$dtype" --warmup 2 --repeats 5 $(torch_flag) --out "$out/$name.json" ;;
    stages_*)
      run_part "$name" "$py" -m benchmarks.stages --config configs/cifar10_vgg19.py \
        --config.compute_dtype="$dtype" --out "$out/$name.json" ;;
  esac
done
if ((${#failed[@]})); then
  echo "failed or timed out: ${failed[*]}"
  exit 1
fi
