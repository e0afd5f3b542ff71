#!/usr/bin/env bash
# Issue 27's comparison on one base config (configs/whitebox.py): plain CAFD and HGD, adaptive
# CAFD and PGD adversarial training of the classifier at equal compute (at the standard inner
# attack, and on the quickstart also the strong one); then their table.
#   launch/whitebox.sh quickstart [ROOT]
#   launch/whitebox.sh cifar10_cpu [ROOT]   (needs ../shared/data/cifar10)
# ROOT (default runs) holds ROOT/BASE (classifier, crafted set, CAFD and HGD; trained here if
# missing) and ROOT/whitebox/BASE/VARIANT (each variant's output and report). Re-running resumes.
set -euo pipefail
base=${1:?usage: launch/whitebox.sh quickstart|cifar10_cpu [ROOT]}
root=${2:-runs}
cd "$(dirname "$0")/.."
upstream="$root/$base"
out="$root/whitebox/$base"
python main.py --config "configs/$base.py" --workdir "$upstream" \
  --config.stages=train_classifier,craft,train_denoiser,train_baselines \
  --config.eval.defenses=none,cafd,hgd
echo "== whitebox $base/denoisers"
python main.py --config "configs/whitebox.py:$base,denoisers" --workdir "$out/denoisers" \
  --config.upstream_workdir="$upstream" --config.eval.denoiser_workdir="$upstream"
suffixes=("")
[[ $base == quickstart ]] && suffixes+=(_strong)  # cifar10_cpu: hours more on 2 cores
for suffix in "${suffixes[@]}"; do
  echo "== whitebox $base/adaptive_cafd$suffix"
  python main.py --config "configs/whitebox.py:$base,adaptive_cafd$suffix" \
    --workdir "$out/adaptive_cafd$suffix" --config.upstream_workdir="$upstream"
  echo "== whitebox $base/adversarial_classifier$suffix"
  python main.py --config "configs/whitebox.py:$base,adversarial_classifier$suffix" \
    --workdir "$out/adversarial_classifier$suffix" \
    --config.classifier.init_from="$upstream/checkpoints/classifier"
done
python -m cafd_jax.whitebox "$out"
