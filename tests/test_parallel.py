"""One code path for 1 and 8 devices, 1 and 2 processes: same losses, parameters, checkpoints."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cafd_jax import checkpoint, data, parallel, pipeline
from configs import tiny

from conftest import ROOT

# Float32 sums in another order, over 6 SGD steps. The losses agree to ~2e-7; parameters move
# by up to ~4e-4 in a few dozen elements of one kernel on jax 0.6.2 and 0.7.2 (30 of 18,432),
# the same with lax convolutions and nn.max_pool in place of models/layers.py, and by ~3e-5 on
# jax 0.10.2 (measured, 2026-11-27): rounding that the XLA:CPU version amplifies. The losses
# stay compared at rtol 1e-5.
RTOL, ATOL = 1e-4, 1e-3


@pytest.fixture(scope="module")
def eight_device_states(tmp_path_factory):
  out = tmp_path_factory.mktemp("parallel")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, os.path.join("tests", "parallel_support.py"), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(out / "states.npz") as arrays:
    return dict(arrays)


def _rounding_noise(path: str) -> bool:
  """Leaves that hold only float rounding noise: biases of convolutions followed by BatchNorm
  (and their optimiser moments), which BatchNorm cancels, so their true gradient is zero; and
  BatchNorm running means, which carry those biases. No two summation orders share them."""
  return ("Conv3x3_" in path and "'bias'" in path) or "'mean'" in path


def _state(arrays, name, trained_only=True):
  """The leaves of a saved state in order; ``trained_only`` drops ``_rounding_noise`` leaves."""
  keys = sorted((key for key in arrays if key.startswith(name + "/")),
                key=lambda key: int(key.split("/")[1]))
  assert keys, name
  if trained_only:
    keys = [key for key in keys if not _rounding_noise(key)]
  return [arrays[key] for key in keys]


def _assert_close(got, want, rtol=RTOL, atol=ATOL):
  assert len(got) == len(want)
  for index, (a, b) in enumerate(zip(got, want)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"leaf {index}")


def test_eight_devices_give_the_losses_and_parameters_of_one(eight_device_states):
  arrays = eight_device_states
  np.testing.assert_allclose(arrays["losses/eight"], arrays["losses/one"], rtol=1e-5)
  assert arrays["losses/one"][-1] != arrays["losses/one"][0]  # the steps did train
  _assert_close(_state(arrays, "eight"), _state(arrays, "one"))
  _assert_close(_state(arrays, "fsdp"), _state(arrays, "one"))
  assert int(arrays["fsdp_split_leaves"]) > 0  # fsdp really split some parameters


def test_checkpoints_move_between_one_and_eight_devices(eight_device_states):
  arrays = eight_device_states
  # Restored exactly, onto the new device count.
  for restored, written in (("eight_on_one", "eight"), ("one_on_eight", "one")):
    _assert_close(_state(arrays, restored, trained_only=False),
                  _state(arrays, written, trained_only=False), rtol=0, atol=0)
  assert int(arrays["devices/eight_on_one"]) == 1 and int(arrays["devices/one_on_eight"]) == 8
  # An epoch on 1 device, then one on 8 devices resumed from its checkpoint.
  _assert_close(_state(arrays, "mixed"), _state(arrays, "one"))


def test_gradient_accumulation_matches_the_whole_batch(eight_device_states):
  arrays = eight_device_states
  _assert_close(_state(arrays, "accumulate2"), _state(arrays, "accumulate1"))


def test_bfloat16_compute_keeps_float32_parameters(eight_device_states):
  arrays = eight_device_states
  assert list(arrays["bf16_param_dtypes"]) == ["float32"]
  bf16, fp32 = _state(arrays, "bf16"), _state(arrays, "one")
  assert all(np.all(np.isfinite(leaf)) for leaf in bf16)
  # Same training, lower precision: close to, not equal to, the float32 parameters.
  differences = [np.max(np.abs(a - b)) for a, b in zip(bf16, fp32)]
  assert 0 < max(differences) < 0.1, differences


def _restored_leaves(workdir):
  """The trained classifier's leaves, without ``_rounding_noise``."""
  variables = pipeline.restore_classifier(tiny.get_config(), str(workdir), 10)
  return [np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]
          if not _rounding_noise(jax.tree_util.keystr(path))]


def _run(launcher, workdir, *overrides):
  command = launcher + ["--config", "configs/tiny.py", "--workdir", str(workdir),
                        "--config.eval.attacks=none,pgd", "--config.eval.defenses=none",
                        "--config.eval.batch_size=50", *overrides]  # 2 evaluation batches
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.mark.slow  # three main.py runs (~3 min on 2 cores); `pytest -m slow`
def test_two_processes_match_one_process(tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  one, two = [sys.executable, "main.py"], ["bash", "launch/local_multiprocess.sh", "2"]
  _run(one, tmp_path / "one", "--config.stages=train_classifier,evaluate")
  trained = _run(two, tmp_path / "two", "--config.stages=train_classifier")
  assert "over 2 process(es)" in trained.stdout
  # Training: the global batch split over the two processes' devices.
  _assert_close(_restored_leaves(tmp_path / "two"), _restored_leaves(tmp_path / "one"))
  # Evaluation of the same checkpoint: each process attacks its share of the batches.
  shutil.copytree(tmp_path / "one", tmp_path / "one_evaluated_by_two")
  os.remove(tmp_path / "one_evaluated_by_two" / "report.json")
  _run(two, tmp_path / "one_evaluated_by_two", "--config.stages=evaluate")
  rows = lambda name: {(r["attack"], r["defense"]): r["accuracy"] for r in json.loads(
      (tmp_path / name / "report.json").read_text())["results"]}
  assert rows("one_evaluated_by_two") == rows("one")


@pytest.mark.slow  # two main.py runs (~2 min on 2 cores); `pytest -m slow`
def test_two_processes_each_read_craft_and_train_on_their_own_shard(tmp_path):
  two = ["bash", "launch/local_multiprocess.sh", "2"]
  trained = _run(two, tmp_path / "run", "--config.stages=train_classifier,craft,train_denoiser",
                 "--config.data.shard_per_process=True")
  assert "process 0 of 2 holds 150 of 300 examples" in trained.stdout
  files = os.listdir(tmp_path / "run" / pipeline.CRAFT_DIR)
  assert {name[:len("shard_00000of00002")] for name in files if name.endswith(".npy")} == {
      "shard_00000of00002", "shard_00001of00002"}
  # One process reads the crafted set back in training-set order: each image within eps of its
  # own natural image (rows mixed up between shards would be far from theirs).
  config = tiny.get_config()
  train_set = pipeline.load_data(config, "train", config.data.num_train)
  to_craft = train_set.take(config.craft.num_examples or None)
  covered, crafted = pipeline.load_crafted(str(tmp_path / "run"), to_craft)
  assert len(covered) == len(crafted) == len(to_craft)
  assert np.abs(crafted - covered.images).max() <= config.craft.eps + 1e-6
  # and evaluates the checkpoints the two processes wrote.
  _run([sys.executable, "main.py"], tmp_path / "run", "--config.stages=evaluate",
       "--config.data.shard_per_process=True")  # the run's config (else: config drift)
  assert json.loads((tmp_path / "run" / "report.json").read_text())["results"]


def test_batches_must_split_over_the_devices():
  mesh = parallel.make_mesh(1)
  assert parallel.local_rows(12, mesh) == slice(0, 12)
  arrays, count = parallel.pad_batch((np.arange(5), np.arange(5) * 2), 4)
  assert count == 5 and [list(a) for a in arrays] == [[0, 1, 2, 3, 4, 4, 4, 4],
                                                      [0, 2, 4, 6, 8, 8, 8, 8]]


def _write_crafted(directory, chunks):
  """``chunks``: {file name: example indices}; each crafted image is filled with its index."""
  os.makedirs(directory / pipeline.CRAFT_DIR, exist_ok=True)
  chunk_size = max(len(indices) for indices in chunks.values())
  (directory / pipeline.CRAFT_DIR / "settings.json").write_text(json.dumps({"batch_size": chunk_size}))
  for name, indices in chunks.items():
    values = np.asarray(indices, np.float32)[:, None, None, None] * np.ones((1, 2, 2, 3), np.float32)
    np.save(directory / pipeline.CRAFT_DIR / name, values)


def test_crafted_set_reads_back_for_any_process_shard_whatever_wrote_it(tmp_path):
  whole = data.Dataset(np.zeros((10, 2, 2, 3), np.float32), np.zeros(10, np.int32), ("a",))
  one_process = {"chunk_00000.npy": range(0, 4), "chunk_00001.npy": range(4, 8),
                 "chunk_00002.npy": range(8, 10)}
  two_shards = {"shard_00000of00002_chunk_00000.npy": [0, 2, 4],
                "shard_00000of00002_chunk_00001.npy": [6, 8],
                "shard_00001of00002_chunk_00000.npy": [1, 3, 5],
                "shard_00001of00002_chunk_00001.npy": [7, 9]}
  for name, chunks in (("one", one_process), ("two", two_shards)):
    _write_crafted(tmp_path / name, chunks)
    read = lambda dataset: pipeline.load_crafted(str(tmp_path / name), dataset)[1][:, 0, 0, 0]
    np.testing.assert_array_equal(read(whole), np.arange(10))
    for shard in ((0, 2), (1, 2), (2, 3)):
      np.testing.assert_array_equal(read(whole.select_shard(shard)),
                                    np.arange(shard[0], 10, shard[1]))
    with pytest.raises(checkpoint.CheckpointError, match="larger than the 6 of this config"):
      read(whole.take(6))  # crafted for another set size
  # Crafting stopped early (e.g. by its budget): the crafted prefix of the set is what there is.
  os.remove(tmp_path / "two" / pipeline.CRAFT_DIR / "shard_00001of00002_chunk_00001.npy")
  covered, crafted = pipeline.load_crafted(str(tmp_path / "two"), whole.select_shard((1, 2)))
  assert covered.num_global == 7 and covered.shard == (1, 2)  # examples 0-6 were crafted
  np.testing.assert_array_equal(crafted[:, 0, 0, 0], [1, 3, 5])
  os.remove(tmp_path / "two" / pipeline.CRAFT_DIR / "shard_00001of00002_chunk_00000.npy")
  with pytest.raises(checkpoint.CheckpointError, match="first 1 of 10 examples, none of those"):
    pipeline.load_crafted(str(tmp_path / "two"), whole.select_shard((1, 2)))
  # Process 0's first chunk missing, its second there: those rows stay where they belong.
  os.remove(tmp_path / "two" / pipeline.CRAFT_DIR / "shard_00000of00002_chunk_00000.npy")
  with pytest.raises(checkpoint.CheckpointError, match="no crafted examples"):
    pipeline.load_crafted(str(tmp_path / "two"), whole)
  chunks = pipeline._crafted_chunks(str(tmp_path / "two" / pipeline.CRAFT_DIR))
  assert [list(indices) for _, indices in chunks] == [[6, 8]]
