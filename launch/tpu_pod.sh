#!/usr/bin/env bash
# Cloud TPU VM pod slice: the same command on every worker (one process per host).
#
#   launch/tpu_pod.sh TPU_NAME ZONE --config configs/cifar10_vgg19.py --workdir gs://BUCKET/runs/vgg19
#
# Copies nothing: each worker needs this repository at ~/cafd-jax with requirements installed
# (e.g. the same gcloud command with `git clone ... && pip install -r requirements.txt gcsfs
# google-cloud-storage`). The workdir is one every host sees: a bucket (gs://, through
# etils.epath and Orbax) or a shared file system such as a Filestore NFS mount.
# jax.distributed.initialize() finds the pod's coordinator and the worker's index itself.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 TPU_NAME ZONE main.py-arguments..." >&2
  exit 2
fi
tpu_name=$1
zone=$2
shift 2
printf -v arguments ' %q' "$@"
gcloud compute tpus tpu-vm ssh "${tpu_name}" --zone "${zone}" --worker=all \
  --command "cd ~/cafd-jax && python main.py${arguments} --config.parallel.distributed=True"
