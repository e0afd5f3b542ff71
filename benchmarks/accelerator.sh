#!/usr/bin/env bash
# The accelerator measurements of docs/benchmarks.md in one run (a few minutes on one GPU):
# the three-step table against PyTorch (when a CUDA torch is installed) and the stage times of
# configs/cifar10_vgg19.py, each in float32 and bfloat16, with TFLOP/s and MFU.
#
#   benchmarks/accelerator.sh [OUT_DIR]      (default: benchmark_results/)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmark_results}
mkdir -p "$out"
torch_flag=--no_torch
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  torch_flag=
fi
python -c "import jax; print(jax.devices())" | tee "$out/devices.txt"
for dtype in float32 bfloat16; do
  python -m benchmarks.compare --models vgg19,resnet18 --batch_size 128 --dtype "$dtype" \
    --warmup 2 --repeats 5 $torch_flag --out "$out/compare_$dtype.json" | tee "$out/compare_$dtype.log"
  python -m benchmarks.stages --config configs/cifar10_vgg19.py \
    --config.compute_dtype="$dtype" --out "$out/stages_$dtype.json" | tee "$out/stages_$dtype.log"
done
