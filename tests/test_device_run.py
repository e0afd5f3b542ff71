"""launch/device_run.sh, dry-run on this CPU: configs/cifar10_h200.py end to end at test sizes
on a packed file, outputs landing in OUT, budgets cutting stages, and the transfer check."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cafd_jax import data

from conftest import ROOT

NUM_CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 10, 12, 4


def _packed_cifar_like(root: Path) -> Path:
  """INPUTS folder holding cifar10.npz: a packed tree of 32x32 synthetic PNGs."""
  for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
    images = data.make_synthetic(NUM_CLASSES * per_class, seed=len(split))
    for index, (image, label) in enumerate(zip(images.images, images.labels)):
      folder = root / "tree" / split / images.class_names[label]
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(np.round(image * 255).astype(np.uint8)).save(folder / f"{index}.png")
  inputs = root / "inputs"
  inputs.mkdir()
  data.write_packed(str(inputs / "cifar10.npz"), data.pack_folder(root / "tree"))
  return inputs


# configs/cifar10_h200.py at test sizes: VGG-19 and the U-Net at 1/8 width, an epoch each, a
# few attack steps, the stages' own budgets off except two that cut: crafting (after its first
# of two chunks) and the baselines (each after its first of three steps).
TEST_SIZES = [
    "--config.model.width=0.125", "--config.classifier.num_epochs=1",
    "--config.classifier.batch_size=40", "--config.craft.batch_size=60",
    "--config.craft.steps=2", "--config.denoiser.width=0.125",
    "--config.denoiser.discriminator_width=0.125", "--config.denoiser.num_epochs=1",
    "--config.denoiser.batch_size=20", "--config.eval.batch_size=20",
    "--config.eval.pgd.steps=2", "--config.eval.autoattack.steps=2",
    "--config.eval.autoattack.n_target_classes=2", "--config.eval.cw.steps=2",
    "--config.eval.ddn.steps=2", "--config.log_every_steps=1",
    "--config.max_seconds.train_classifier=0", "--config.max_seconds.train_denoiser=0",
    "--config.max_seconds.evaluate=0", "--config.max_seconds.craft=0.001",
    "--config.max_seconds.train_baselines=0.001",
]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("device")
  inputs = _packed_cifar_like(root)
  env = dict(os.environ, OUT=str(root / "out"), INPUTS=str(inputs), PYTHON=sys.executable,
             WORKDIR=str(root / "work"), RUN_SECONDS="1200",
             BENCH_FLAGS="--models vgg_tiny --batch_size 8 --warmup 1 --repeats 1 "
                         "--benchmarks classifier_step")
  result = subprocess.run(["bash", "launch/device_run.sh", *TEST_SIZES], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500, check=False)
  return root, result


def test_the_run_writes_every_output_to_out(dry_run):
  root, result = dry_run
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  out = root / "out"
  expected = {"run.log", "stages.json", "report.json", "report.md", "figures.tar",
              "compare_bfloat16.json", "compare_float32.json"}
  assert set(os.listdir(out)) == expected  # at most 8 files come back from the device
  with tarfile.open(out / "figures.tar") as archive:
    assert {"figures/cam_grid.png", "figures/training_curves.png"} <= set(archive.getnames())
  for dtype in ("bfloat16", "float32"):
    rows = json.loads((out / f"compare_{dtype}.json").read_text())
    assert [(row["model"], row["benchmark"], row["dtype"]) for row in rows] == [
        ("vgg_tiny", "classifier_step", dtype)]
    assert rows[0]["jax_img_s"] > 0
  stdout = result.stdout
  for stage in ("train_classifier", "craft", "train_denoiser", "train_baselines", "evaluate"):
    assert sum(line.startswith(f"[pipeline] {stage} took") for line in stdout.splitlines()) == 1
  assert "[train_classifier] test accuracy" in stdout and "| attack | eps |" in stdout
  assert "pipeline exit status 0" in stdout and "[device_run" in stdout
  log = (out / "run.log").read_text()
  assert "[train_classifier] step 1/3" in log  # the whole log, not only the summary


def test_the_h200_config_runs_every_stage_and_budgets_cut_two(dry_run):
  root, result = dry_run
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  report = json.loads((root / "out" / "report.json").read_text())
  config = report["config"]
  assert (config["model"]["name"], config["compute_dtype"]) == ("vgg19", "bfloat16")
  assert config["data"]["source"].startswith("packed:")
  stages = report["metadata"]["stages"]
  assert stages == json.loads((root / "out" / "stages.json").read_text())
  assert [name for name, record in stages.items() if record["cut"]] == ["craft",
                                                                         "train_baselines"]
  assert stages["craft"]["cut_at"] == [{"chunk": "1/2", "examples": "60/120"}]
  assert [cut["stage"] for cut in stages["train_baselines"]["cut_at"]] == [
      "train_pixel_denoiser", "train_hgd_denoiser"]
  assert all(cut["step"] == "1/3" for cut in stages["train_baselines"]["cut_at"])
  assert "training on the 60 of 120 examples crafted" in result.stdout + (
      root / "out" / "run.log").read_text()
  # The later stages ran in full: every row of the H200 grid, in its order.
  rows = [(r["attack"], r["threat_model"], r["defense"]) for r in report["results"]]
  unseen = [(a, "unseen", d) for a in ("none", "pgd", "autoattack", "cw", "ddn")
            for d in ("none", "cafd", "hgd", "pixel")]
  assert rows == unseen + [("pgd", "white_box", "cafd")]
  assert all(row["n"] == NUM_CLASSES * TEST_PER_CLASS for row in report["results"])


def test_travel_check_counts_the_inputs_and_fails_above_60_mib(tmp_path):
  inputs = tmp_path / "inputs"
  (inputs / "wheels").mkdir(parents=True)
  (inputs / "cifar10.npz").write_bytes(b"x" * 1000)
  (inputs / "wheels" / "a-1.0-py3-none-any.whl").write_bytes(b"y" * 300)
  check = lambda: subprocess.run(["bash", "launch/device_run.sh", "--check"], cwd=ROOT,
                                 env=dict(os.environ, INPUTS=str(inputs)), capture_output=True,
                                 text=True, timeout=60, check=False)
  passed = check()
  assert passed.returncode == 0, passed.stderr
  assert f"{inputs}/cifar10.npz: 1000 bytes" in passed.stdout
  assert f"{inputs}/wheels: 300 bytes (1 wheels)" in passed.stdout
  tree = int(passed.stdout.split("working tree (tracked and untracked, not ignored): ")[1].split()[0])
  assert 100_000 < tree < 5 * 2**20  # the repository's own files
  assert f"total: {tree + 1300} bytes" in passed.stdout
  with open(inputs / "cifar10.npz", "wb") as file:  # sparse: 61 MiB without writing them
    file.truncate(61 * 2**20)
  failed = check()
  assert failed.returncode == 1 and "over the limit" in failed.stderr
  os.remove(inputs / "cifar10.npz")
  missing = check()
  assert missing.returncode == 1 and "--prepare" in missing.stderr
