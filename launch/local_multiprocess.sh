#!/usr/bin/env bash
# Runs main.py as N cooperating processes on this machine (CPU; for testing multi-host code).
#
#   launch/local_multiprocess.sh N --config configs/tiny.py --workdir /tmp/run2p [--config.X=...]
#
# Process i gets --config.parallel.process_id=i and one CPU device (set XLA_FLAGS to
# --xla_force_host_platform_device_count=K for K each). Process 0 prints to the terminal; the
# others log to a temporary folder, whose tail is shown for a process that fails.
set -euo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: $0 NUM_PROCESSES main.py-arguments..." >&2
  exit 2
fi
num_processes=$1
shift
cd "$(dirname "$0")/.."
port=$(python -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
logs=$(mktemp -d)
pids=()
for ((i = 0; i < num_processes; i++)); do
  args=("$@" --config.parallel.distributed=True
        --config.parallel.coordinator_address="localhost:${port}"
        --config.parallel.num_processes="${num_processes}" --config.parallel.process_id="${i}")
  if [[ $i -eq 0 ]]; then
    python main.py "${args[@]}" &
  else
    python main.py "${args[@]}" > "${logs}/process_${i}.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    status=1
    if [[ $i -gt 0 ]]; then
      echo "process ${i} failed; its log:" >&2
      tail -n 30 "${logs}/process_${i}.log" >&2
    fi
  fi
done
rm -rf "${logs}"
exit "${status}"
