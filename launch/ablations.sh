#!/usr/bin/env bash
# The ablations of configs/ablations.py on one base config, then their table.
#   launch/ablations.sh quickstart [ROOT [VARIANTS]]   (about 5 min per variant on 2 CPU cores)
#   launch/ablations.sh cifar10_cpu [ROOT [VARIANTS]]  (needs ../shared/data/cifar10)
# VARIANTS: comma-separated names of configs/ablations.py (default: all).
# ROOT (default runs) holds ROOT/BASE (classifier + crafted set, made here if missing) and
# ROOT/ablations/BASE/VARIANT (one denoiser and its report each). Re-running resumes.
set -euo pipefail
base=${1:?usage: launch/ablations.sh quickstart|cifar10_cpu [ROOT [VARIANTS]]}
root=${2:-runs}
cd "$(dirname "$0")/.."
variants=${3:-$(python -c "from configs import ablations; print(','.join(ablations.VARIANTS))")}
python main.py --config "configs/$base.py" --workdir "$root/$base" \
  --config.stages=train_classifier,craft
for variant in ${variants//,/ }; do
  echo "== ablation $base/$variant"
  python main.py --config "configs/ablations.py:$base,$variant" \
    --workdir "$root/ablations/$base/$variant" --config.upstream_workdir="$root/$base"
done
python -m cafd_jax.ablations "$root/ablations/$base"
