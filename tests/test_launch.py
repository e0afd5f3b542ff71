"""launch/: the SLURM script's processes and GPU layout, the TPU pod script's command line, and
the one-line error of a distributed run with no cluster.

No cluster here: SLURM is imitated by an ``srun`` that starts the tasks as local processes with
the variables SLURM gives them, and ``gcloud`` by one that runs the worker command locally.
"""

import json
import os
import random
import socket
import subprocess
import sys

import pytest

from cafd_jax import parallel

from conftest import ROOT, write_executable

SLURM_PORTS = (65535 - 2**12 + 1, 65535)  # JAX's SLURM coordinator port: job id % 4096 + first


@pytest.mark.parametrize("environ, expected", [
    ({}, None),  # not SLURM
    ({"SLURM_JOB_ID": "7", "SLURM_TASKS_PER_NODE": "1(x4)"}, None),  # no GPUs listed
    ({"SLURM_JOB_ID": "7", "SLURM_TASKS_PER_NODE": "1", "CUDA_VISIBLE_DEVICES": "NoDevFiles"},
     None),  # SLURM's value for a step with no GPUs
    ({"SLURM_JOB_ID": "7", "SLURM_TASKS_PER_NODE": "1(x4)", "SLURM_NODEID": "2",
      "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, list(range(8))),  # one task drives the node
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_LOCALID": "5",
      "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, [5]),  # one task per GPU, as JAX does
    ({"SLURM_JOB_ID": "7", "SLURM_TASKS_PER_NODE": "2,4", "SLURM_NODEID": "1",
      "SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, [6, 7]),  # 4 on node 1
    ({"SLURM_JOB_ID": "7", "SLURM_TASKS_PER_NODE": "8", "SLURM_LOCALID": "5",
      "CUDA_VISIBLE_DEVICES": "5"}, [0]),  # bound by SLURM to one GPU
    ({"SLURM_JOB_ID": "7", "SLURM_TASKS_PER_NODE": "2", "SLURM_GPUS_PER_TASK": "2",
      "SLURM_LOCALID": "1", "CUDA_VISIBLE_DEVICES": "2,3"}, [0, 1]),  # --gpus-per-task
    ({"SLURM_JOB_ID": "7", "SLURM_TASKS_PER_NODE": "3", "CUDA_VISIBLE_DEVICES": "0,1,2,3"},
     None),  # uneven: JAX's choice
    ({"SLURM_JOB_ID": "7", "SLURM_TASKS_PER_NODE": "1", "JAX_LOCAL_DEVICE_IDS": "0",
      "CUDA_VISIBLE_DEVICES": "0,1"}, None),  # the user's own choice, read by JAX
])
def test_slurm_tasks_drive_their_share_of_the_node_gpus(environ, expected):
  assert parallel.slurm_local_device_ids(environ) == expected


def _path_with(bin_dir) -> str:
  """PATH with ``bin_dir``'s stand-in commands first."""
  return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def _free_slurm_port() -> int:
  for port in random.sample(range(SLURM_PORTS[0], SLURM_PORTS[1] + 1), 200):
    with socket.socket() as probe:
      try:
        probe.bind(("localhost", port))
      except OSError:
        continue
      return port
  pytest.skip(f"no free port in {SLURM_PORTS} for JAX's SLURM coordinator")


FAKE_SRUN = """#!/usr/bin/env bash
# srun for one node: SLURM_NTASKS local processes, with the variables SLURM sets for a step.
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 SLURM_STEP_NODELIST=localhost \\
    SLURM_STEP_TASKS_PER_NODE=$SLURM_NTASKS "$@" > "$FAKE_SRUN_LOGS/task_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
cat "$FAKE_SRUN_LOGS"/task_*.log
exit $status
"""


def test_slurm_script_joins_its_tasks_through_jax_cluster_detection(tmp_path):
  bin_dir, logs = tmp_path / "bin", tmp_path / "logs"
  bin_dir.mkdir()
  logs.mkdir()
  write_executable(bin_dir / "srun", FAKE_SRUN)
  # This interpreter by its own path (a venv's python reached through a link starts without
  # the venv's packages).
  write_executable(bin_dir / "python", f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
  env = dict(os.environ, PATH=_path_with(bin_dir), FAKE_SRUN_LOGS=str(logs),
             SLURM_JOB_ID=str(_free_slurm_port() - SLURM_PORTS[0]), SLURM_NTASKS="2",
             SLURM_SUBMIT_DIR=str(ROOT), JAX_PLATFORMS="cpu")
  result = subprocess.run(
      ["bash", str(ROOT / "launch" / "slurm_gpu.sbatch"), "--config", "configs/tiny.py",
       "--workdir", str(tmp_path / "run"), "--config.stages=train_classifier"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  assert "over 2 process(es)" in result.stdout  # printed by task 0 once both had joined
  assert (tmp_path / "run" / "checkpoints").is_dir()


FAKE_GCLOUD = """#!/usr/bin/env bash
# gcloud compute tpus tpu-vm ssh NAME --zone Z --worker=all --command CMD: CMD here, in bash.
echo "$*" > "$FAKE_GCLOUD_CALL"
while [[ $# -gt 0 && $1 != --command ]]; do shift; done
exec bash -c "$2"
"""
RECORDING_PYTHON = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_PYTHON_ARGS"], "w") as file:
  json.dump({"cwd": os.getcwd(), "args": sys.argv[1:]}, file)
"""


def test_tpu_pod_script_passes_every_argument_through_unchanged(tmp_path):
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  home.mkdir()
  bin_dir.mkdir()
  (home / "cafd-jax").symlink_to(ROOT)
  write_executable(bin_dir / "gcloud", FAKE_GCLOUD)
  write_executable(bin_dir / "python", RECORDING_PYTHON)
  env = dict(os.environ, HOME=str(home), PATH=_path_with(bin_dir),
             FAKE_GCLOUD_CALL=str(tmp_path / "call.txt"), FAKE_PYTHON_ARGS=str(tmp_path / "args"))
  arguments = ["--config", "configs/cifar10_vgg19.py", "--workdir", "/mnt/my runs/it's $HOME",
               "--config.eval.attacks=pgd,cw"]
  result = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), "my-tpu", "us-z1-a",
                           *arguments], env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  call = (tmp_path / "call.txt").read_text()
  assert call.startswith("compute tpus tpu-vm ssh my-tpu --zone us-z1-a --worker=all --command")
  recorded = json.loads((tmp_path / "args").read_text())
  assert os.path.samefile(recorded["cwd"], ROOT)  # ~/cafd-jax on the worker
  assert recorded["args"] == ["main.py", *arguments, "--config.parallel.distributed=True"]


def test_tpu_pod_script_needs_a_name_and_a_zone():
  result = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), "my-tpu"],
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and result.stderr.startswith("usage:")


def test_distributed_without_a_cluster_fails_in_one_line(tmp_path):
  env = {key: value for key, value in os.environ.items()
         if not key.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR"))}
  result = subprocess.run(
      [sys.executable, "main.py", "--config", "configs/tiny.py", "--workdir",
       str(tmp_path / "work"), "--config.parallel.distributed=True"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().count("\n") == 0, result.stderr
  assert result.stderr.startswith("error: parallel.distributed=True found no cluster to join")
  assert not (tmp_path / "work").exists()
