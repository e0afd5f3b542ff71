#!/usr/bin/env bash
# The accelerator measurements of docs/benchmarks.md in one run (its length on a GPU is not
# known yet: the one try so far ran past a 590 s limit, see docs/benchmarks.md): the three-step
# table against PyTorch (when a CUDA torch is installed) and the stage times of
# configs/cifar10_vgg19.py, float32 then bfloat16, with TFLOP/s and MFU. Each part writes its
# log to OUT_DIR as it goes, has its own time limit (PART_TIMEOUT seconds, default 240) and
# does not stop the parts after it when it fails.
#
#   [PYTHON=...] benchmarks/accelerator.sh [OUT_DIR]      (default: benchmark_results/)
#
# PYTHON (default python3) must be an interpreter with jax (and torch for the comparison):
# name a virtual environment's python by its own path, not through a symlink elsewhere (a
# venv python reached through another folder's link starts without the venv's packages).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmark_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# JAX and PyTorch share the GPU in compare.py: JAX takes less than its default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
py=${PYTHON:-python3}
failed=()

part() {  # part NAME COMMAND...: run it under the time limit, log to $out/NAME.log
  local name=$1
  shift
  echo "== $name: $*"
  if ! timeout -k 10 "${PART_TIMEOUT:-240}" "$@" 2>&1 | tee "$out/$name.log"; then
    failed+=("$name")
  fi
}

torch_flag=--no_torch
if timeout 120 "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  torch_flag=
fi
timeout -k 10 120 "$py" - <<'EOF' 2>&1 | tee "$out/devices.txt" || failed+=(devices)
import importlib.metadata as metadata
import jax
print(jax.devices())
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch"):
  try:
    print(name, metadata.version(name))
  except metadata.PackageNotFoundError:
    print(name, "not installed")
EOF
for dtype in float32 bfloat16; do
  part "compare_$dtype" "$py" -m benchmarks.compare --models vgg19,resnet18 --batch_size 128 \
    --dtype "$dtype" --warmup 2 --repeats 5 $torch_flag --out "$out/compare_$dtype.json"
done
for dtype in float32 bfloat16; do
  part "stages_$dtype" "$py" -m benchmarks.stages --config configs/cifar10_vgg19.py \
    --config.compute_dtype="$dtype" --out "$out/stages_$dtype.json"
done
if ((${#failed[@]})); then
  echo "failed or timed out: ${failed[*]}"
  exit 1
fi
