#!/usr/bin/env bash
# The one prepared call of a lent GPU (launch/README.md): CIFAR-10 VGG-19 CAFD under stage
# budgets (configs/cifar10_h200.py), then the GPU rows of benchmarks.compare, all within
# RUN_SECONDS (540) of wall time, every output written to $OUT as it appears.
#
#   launch/device_run.sh --prepare   here: pack ../shared/data/cifar10 and fetch the wheels the
#                                    device lacks into device_inputs/ (ignored by git), then --check
#   launch/device_run.sh --check     print the bytes that would travel; fail above 60 MiB
#   launch/device_run.sh [MAIN_PY_FLAGS...]   run (on the device), extra flags go to main.py
#
# Environment: OUT (where the outputs go; default ./device_out), INPUTS (default device_inputs),
# PYTHON (default /opt/torch/.venv/bin/python3 where it exists, else python3), RUN_SECONDS
# (default 540), WORKDIR (default a new temporary folder), CONFIG (default
# configs/cifar10_h200.py), BENCH_FLAGS (benchmarks.compare flags besides --dtype; default
# "--models vgg19 --batch_size 256 --warmup 2 --repeats 5"; empty: no benchmark).
#
# Files in $OUT (at most 8 come back from the device): run.log (everything), stages.json,
# report.json, report.md, figures.tar, compare_bfloat16.json, compare_float32.json. Stdout
# gets one summary line per stage, the evaluation rows, the benchmark rows and report.md.
set -uo pipefail
cd "$(dirname "$0")/.."
inputs=${INPUTS:-device_inputs}
limit_mib=60
wheel_packages=(ml-collections tensorboardX)  # in requirements.txt, not on the device (KINDS.md)
if [[ -n "${PYTHON:-}" ]]; then
  py=$PYTHON
elif [[ -x /opt/torch/.venv/bin/python3 ]]; then
  py=/opt/torch/.venv/bin/python3
else
  py=python3
fi

travel_check() {  # prints the bytes that travel with the device call; fails above the limit
  local tree inputs_bytes packed wheels total
  tree=$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
         | awk '{s += $1} END {print s + 0}')
  packed=0 wheels=0
  [[ -f "$inputs/cifar10.npz" ]] && packed=$(stat -c %s "$inputs/cifar10.npz")
  if compgen -G "$inputs/wheels/*.whl" >/dev/null; then
    wheels=$(stat -c %s "$inputs"/wheels/*.whl | awk '{s += $1} END {print s + 0}')
  fi
  inputs_bytes=$(find "$inputs" -type f -printf '%s\n' 2>/dev/null | awk '{s += $1} END {print s + 0}')
  total=$((tree + inputs_bytes))
  echo "working tree (tracked and untracked, not ignored): $tree bytes"
  echo "$inputs/cifar10.npz: $packed bytes"
  echo "$inputs/wheels: $wheels bytes ($(compgen -G "$inputs/wheels/*.whl" | wc -l) wheels)"
  echo "other files in $inputs: $((inputs_bytes - packed - wheels)) bytes"
  awk -v t="$total" -v l="$limit_mib" 'BEGIN {printf "total: %d bytes = %.1f MiB of the %d MiB allowed (the device takes 64)\n", t, t / 1048576, l}'
  if [[ ! -f "$inputs/cifar10.npz" ]]; then
    echo "missing $inputs/cifar10.npz: run launch/device_run.sh --prepare" >&2
    return 1
  fi
  if ((total > limit_mib * 1048576)); then
    echo "over the limit: remove files from $inputs or the working tree" >&2
    return 1
  fi
}

prepare() {  # the packed data and the wheels, into $inputs (ignored by git)
  mkdir -p "$inputs/wheels"
  if [[ ! -f "$inputs/cifar10.npz" ]]; then
    "$py" launch/pack_images.py ../shared/data/cifar10 "$inputs/cifar10.npz" || return 1
  fi
  local name version
  for name in "${wheel_packages[@]}"; do
    version=$("$py" -c "import importlib.metadata as m; print(m.version('$name'))") || return 1
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation py --platform any -d "$inputs/wheels" "$name==$version" || return 1
  done
  travel_check
}

case "${1:-}" in
  --check) travel_check; exit ;;
  --prepare) prepare; exit ;;
esac

start=$SECONDS
deadline=$((start + ${RUN_SECONDS:-540}))
left() { echo $((deadline - SECONDS)); }
out=${OUT:-device_out}
mkdir -p "$out"
log="$out/run.log"
: >"$log"
export PYTHONUNBUFFERED=1
say() { echo "[device_run $((SECONDS - start))s] $*" | tee -a "$log"; }
workdir=${WORKDIR:-$(mktemp -d /tmp/cafd-device-XXXXXX)}
config=${CONFIG:-configs/cifar10_h200.py}

copy_outputs() {  # what the workdir holds now, into $out (each file replaced whole)
  local name
  for name in stages.json report.json report.md; do
    if [[ -f "$workdir/$name" ]]; then
      cp "$workdir/$name" "$out/.$name.tmp" && mv "$out/.$name.tmp" "$out/$name"
    fi
  done
  if compgen -G "$workdir/figures/*.png" >/dev/null; then
    tar -cf "$out/.figures.tar.tmp" -C "$workdir" figures && mv "$out/.figures.tar.tmp" "$out/figures.tar"
  fi
}

if compgen -G "$inputs/wheels/*.whl" >/dev/null; then
  site=$(mktemp -d /tmp/cafd-site-XXXXXX)
  if timeout 120 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target "$site" "$inputs"/wheels/*.whl >>"$log" 2>&1; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    say "installed $(ls "$inputs"/wheels | tr '\n' ' ')"
  else
    say "wheel install failed (see run.log)"
  fi
fi

timeout 120 "$py" - >>"$log" 2>&1 <<'EOF'
import importlib.metadata as metadata
import jax
print("devices", jax.devices())
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "ml-collections",
             "tensorboardX", "numpy", "torch"):
  try:
    print(name, metadata.version(name))
  except metadata.PackageNotFoundError:
    print(name, "not installed")
EOF
say "$(grep -m1 '^devices' "$log" || echo 'devices: the device query failed (see run.log)')"
say "$(grep -E '^(jax|jaxlib|flax|optax|orbax-checkpoint|ml-collections|torch) ' "$log" | tr '\n' ' ')"

# The pipeline, leaving 20 s for copying its outputs and the benchmarks' own minimum.
say "pipeline: $config, workdir $workdir, $(($(left) - 20)) s at most"
(while sleep 5; do copy_outputs; done) &
copier=$!
timeout -k 10 $(($(left) - 20)) "$py" main.py --config "$config" --workdir "$workdir" \
  --config.data.source="packed:$inputs/cifar10.npz" "$@" 2>&1 | tee -a "$log" \
  | grep --line-buffered -E '^\[pipeline\]|test accuracy|time budget|^\[evaluate\]|^error'
pipeline_status=${PIPESTATUS[0]}
kill "$copier" 2>/dev/null
wait "$copier" 2>/dev/null
copy_outputs
say "pipeline exit status $pipeline_status$( ((pipeline_status == 124)) && echo ' (timed out)')"

# The GPU rows of benchmarks.compare, bfloat16 first (the dtype the pipeline trains in).
bench_flags=${BENCH_FLAGS-"--models vgg19 --batch_size 256 --warmup 2 --repeats 5"}
if [[ -n "$bench_flags" ]]; then
  torch_flag=--no_torch
  if timeout 60 "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
      >/dev/null 2>&1; then
    torch_flag=""
  fi
  for dtype in bfloat16 float32; do
    if (($(left) < 40)); then
      say "benchmark $dtype skipped: $(left) s left"
      continue
    fi
    say "benchmark $dtype: $(($(left) - 10)) s at most"
    # shellcheck disable=SC2086  # the flags are words
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 timeout -k 5 $(($(left) - 10)) "$py" -m benchmarks.compare \
      $bench_flags --dtype "$dtype" $torch_flag --out "$out/compare_$dtype.json" 2>&1 \
      | tee -a "$log"
  done
fi

if [[ -f "$out/report.md" ]]; then
  cat "$out/report.md"
fi
say "done; $out holds: $(ls "$out" | tr '\n' ' ')"
exit "$pipeline_status"
