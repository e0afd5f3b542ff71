"""main.py end to end on the tiny config: stages, report, resume, API, and clear failures."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafd_jax import api, data
from cafd_jax.attacks import registry

from conftest import ROOT, assert_in_box, run_main


_main = run_main


def test_report_schema_and_table(finished_run):
  workdir, result = finished_run
  report = json.loads((workdir / "report.json").read_text())
  assert report["config"]["model"]["name"] == "vgg_tiny"
  cells = {(row["attack"], row["defense"]) for row in report["results"]}
  assert cells == {(a, d) for a in ("none", "pgd", "caf") for d in ("none", "cafd")}
  for row in report["results"]:
    assert set(row) >= {"attack", "defense", "threat_model", "model", "eps", "accuracy", "n"}
    assert 0.0 <= row["accuracy"] <= 1.0 and row["n"] == 100
  assert {"jax", "flax", "devices", "xla_flags", "seed", "wall_time_s",
          "stage_seconds"} <= set(report["metadata"])
  assert set(report["metadata"]["stage_seconds"]) == {
      "train_classifier", "craft", "train_denoiser", "train_baselines", "evaluate"}
  assert isinstance(report["integrity"], list)
  table = (workdir / "report.md").read_text()
  assert "| attack | eps | threat model | none | cafd |" in table
  assert "## Integrity checks" in table
  for stage in ("train_classifier", "train_denoiser"):
    assert os.listdir(workdir / "tensorboard" / stage), stage
  assert "[train_classifier] step" in result.stdout and "img/s" in result.stdout
  assert not list(workdir.glob("**/.tmp-*")), "temporary files left behind"


def test_api_restores_what_evaluation_measured(finished_run):
  workdir, _ = finished_run
  defended = api.load(str(workdir))
  report = json.loads((workdir / "report.json").read_text())
  accuracy = {(row["attack"], row["defense"]): row["accuracy"] for row in report["results"]}
  config = defended.config
  test_set = data.load_split(config.data.source, "test", num_examples=config.data.num_test,
                             seed=config.seed)
  images, labels = jnp.asarray(test_set.images), test_set.labels
  purified = defended.purify(images)
  assert purified.shape == images.shape
  assert_in_box(purified)
  bare = np.mean(np.argmax(defended.classify(images), -1) == labels)
  behind = np.mean(np.argmax(defended.defended_logits(images), -1) == labels)
  assert bare == pytest.approx(accuracy[("none", "none")])
  assert behind == pytest.approx(accuracy[("none", "cafd")])


def test_rerun_resumes_every_stage_and_reproduces_the_report(finished_run):
  workdir, _ = finished_run
  before = json.loads((workdir / "report.json").read_text())["results"]
  result = _main(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 1/" not in result.stdout  # nothing retrained
  assert "[craft] chunk" not in result.stdout  # nothing re-crafted
  assert json.loads((workdir / "report.json").read_text())["results"] == before


def test_evaluate_alone_needs_checkpoints(tmp_path):
  result = _main(tmp_path / "empty", "--config.stages=evaluate")
  assert result.returncode == 2
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith("error: No classifier checkpoint") and "run its training stage first" in line


def test_missing_data_folder_fails_cleanly(tmp_path):
  workdir = tmp_path / "work"
  result = _main(workdir, f"--config.data.source=folder:{tmp_path / 'nowhere'}")
  assert result.returncode == 2
  assert result.stderr.strip().count("\n") == 0, result.stderr
  assert str(tmp_path / "nowhere") in result.stderr
  assert not workdir.exists(), "a failed run left a workdir behind"


def test_bad_config_value_fails_cleanly(tmp_path):
  workdir = tmp_path / "work"
  result = _main(workdir, "--config.model.name=vgg7")
  assert result.returncode == 2
  assert result.stderr.strip() == ("error: config.model.name: unknown 'vgg7'; choose from "
                                   "vgg_tiny,vgg11,vgg13,vgg16,vgg19,vgg11_ref,vgg13_ref,vgg16_ref,vgg19_ref,"
                                   "resnet18,resnet34,resnet50,wrn,"
                                   "airbench93,airbench94 or import:package.module:factory.")
  assert not workdir.exists()


def test_every_registered_attack_runs_through_the_evaluation_stage(finished_run, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir, _ = finished_run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  attacks = ",".join(sorted(registry.ATTACKS))  # configs/tiny.py gives each a few steps
  result = _main(copy, "--config.stages=evaluate", f"--config.eval.attacks={attacks}",
                 "--config.eval.num_examples=20")
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads((copy / "report.json").read_text())["results"]
  assert {(row["attack"], row["defense"]) for row in rows} == {
      (a, d) for a in attacks.split(",") for d in ("none", "cafd")}


def test_evaluation_grid_covers_threat_models_defenses_and_the_eps_sweep(finished_run, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir, _ = finished_run
  copy = tmp_path / "grid"
  shutil.copytree(workdir, copy)
  defenses = ("none", "cafd", "bit_depth", "median", "jpeg")
  result = _main(copy, "--config.stages=evaluate", "--config.eval.attacks=none,pgd",
                 f"--config.eval.defenses={','.join(defenses)}",
                 "--config.eval.threat_models=unseen,bpda,white_box",
                 "--config.eval.sweep_eps=(0.0,)", "--config.eval.num_examples=40")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((copy / "report.json").read_text())
  cells = {(r["attack"], round(r["eps"], 6), r["threat_model"], r["defense"])
           for r in report["results"]}
  adaptive = [(t, d) for t in ("bpda", "white_box") for d in defenses if d != "none"]
  expected = {("none", 0.0, "unseen", d) for d in defenses}
  for eps in (round(8 / 255, 6), 0.0):
    expected |= {("pgd", eps, "unseen", d) for d in defenses}
    expected |= {("pgd", eps, t, d) for t, d in adaptive}
  assert len(report["results"]) == len(expected) == 5 + 2 * 13
  assert cells == expected
  for row in report["results"]:  # the non-differentiable transforms are attacked with BPDA
    expect_bpda = row["threat_model"] == "white_box" and row["defense"] in ("bit_depth", "jpeg")
    assert (row.get("gradient") == "bpda") == expect_bpda, row
  checks = {f["check"] for f in report["integrity"]}
  assert {"accuracy_falls_with_eps", "white_box_not_above_unseen",
          "zero_eps_matches_clean"} <= checks


def test_a_transfer_target_is_read_from_its_own_run_not_this_runs_upstream(tmp_path):
  from cafd_jax import io_utils, pipeline  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.upstream_workdir = str(tmp_path / "upstream")
  other = tiny.get_config()
  other.model.name = "resnet18"
  other.classifier.lookahead = not config.classifier.lookahead  # another checkpoint structure
  io_utils.write_json(str(tmp_path / "other" / "config.json"), other.to_dict())
  config.eval.transfer_workdirs = (str(tmp_path / "other"),)
  [(target, target_dir)] = pipeline._transfer_targets(config)  # pylint: disable=protected-access
  assert target.model.name == "resnet18" and target_dir == str(tmp_path / "other")
  assert target.classifier.lookahead == other.classifier.lookahead
  assert pipeline.upstream(target, target_dir) == target_dir


def test_baselines_transfer_figures_and_report_rebuild(finished_run, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir, _ = finished_run
  copy, other = tmp_path / "grid", tmp_path / "other"
  shutil.copytree(workdir, copy)
  trained = _main(other, "--config.stages=train_classifier", "--config.model.width=0.5")
  assert trained.returncode == 0, trained.stderr[-3000:]
  defenses = ("none", "cafd", "pixel", "hgd", "cafd_caf")
  result = _main(copy, "--config.stages=train_baselines,evaluate",
                 "--config.eval.attacks=none,pgd", f"--config.eval.defenses={','.join(defenses)}",
                 "--config.eval.threat_models=unseen,white_box",
                 "--config.eval.adaptive_defenses=pixel",
                 f"--config.eval.transfer_workdirs=('{other}',)", "--config.eval.num_examples=20",
                 "--config.eval.transfer_attacks=none")
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ("pixel", "hgd", "cafd_caf"):
    assert os.listdir(copy / "checkpoints" / f"denoiser_{name}"), name
    assert f"[train_{name}_denoiser] step" in result.stdout
  # cafd_caf is CAFD with the CAF loss (tiny's cafd uses plain features): another denoiser.
  images = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)
  assert not np.allclose(api.load(str(copy), "cafd_caf").purify(images),
                         api.load(str(copy), "cafd").purify(images))
  report = json.loads((copy / "report.json").read_text())
  cells = {(r["model"], r["attack"], r["threat_model"], r["defense"]) for r in report["results"]}
  expected = set()
  for model, attacks in (("vgg_tiny", ("none", "pgd")), ("vgg_tiny@other", ("none",))):
    expected |= {(model, a, "unseen", d) for a in attacks for d in defenses}
  expected |= {("vgg_tiny", "pgd", "white_box", "pixel")}  # eval.transfer_attacks: none only
  assert cells == expected
  accuracy = {(r["model"], r["attack"], r["defense"]): r["accuracy"] for r in report["results"]}
  assert accuracy[("vgg_tiny@other", "none", "none")] != accuracy[("vgg_tiny", "none", "none")]
  names = ("accuracy_vs_eps.png", "cam_grid.png", "training_curves.png")
  markdown = (copy / "report.md").read_text()
  assert "| model | attack |" in markdown
  for name in names[1:]:  # one budget per attack: no accuracy-vs-eps curve
    assert (copy / "figures" / name).stat().st_size > 1000, name
  assert not (copy / "figures" / names[0]).exists()
  for name in names[1:]:
    os.remove(copy / "figures" / name)
  os.remove(copy / "report.md")
  rebuilt = _main(copy, "--config.stages=report")
  assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
  assert "rebuilt" in rebuilt.stdout and "[evaluate]" not in rebuilt.stdout
  assert (copy / "report.md").read_text() == markdown
  for name in names[1:]:
    assert (copy / "figures" / name).stat().st_size > 1000, name


def test_upstream_workdir_shares_classifier_and_crafted_set_with_gradcampp(finished_run,
                                                                          tmp_path):
  """An ablation run: only the denoiser is new, with Grad-CAM++ CAF at an earlier layer."""
  workdir, _ = finished_run
  ablation = tmp_path / "ablations" / "gradcampp"  # a variant name of configs/ablations.py
  result = _main(ablation, "--config.stages=train_denoiser,evaluate",
                 f"--config.upstream_workdir={workdir}", "--config.caf.loss_kind=weighted_features",
                 "--config.caf.weights=gradcampp", "--config.caf.feature_layer=Conv3x3_2:input",
                 "--config.eval.attacks=none,pgd")
  assert result.returncode == 0, result.stderr[-3000:]
  assert not (ablation / "checkpoints" / "classifier").exists() and not (ablation / "craft").exists()
  assert os.listdir(ablation / "checkpoints" / "denoiser")

  def accuracy(path, attack, defense):
    rows = json.loads((path / "report.json").read_text())["results"]
    return next(r["accuracy"] for r in rows if (r["attack"], r["defense"], r["threat_model"])
                == (attack, defense, "unseen"))
  assert accuracy(ablation, "none", "none") == accuracy(workdir, "none", "none")  # same classifier
  assert accuracy(ablation, "pgd", "none") == accuracy(workdir, "pgd", "none")
  from cafd_jax import ablations  # pylint: disable=g-import-not-at-top
  table = ablations.table(str(tmp_path / "ablations"))
  assert table.count("\n") == 2 and "| gradcampp | cafd |" in table


@pytest.mark.slow  # a fourth full pipeline (~1-2 min on 2 cores); `pytest -m slow`
def test_flatten_mlp_classifier_runs_the_whole_pipeline_with_gradcam(tmp_path):
  """No GAP + dense head, so no CAM: Grad-CAM weights drive crafting, training and evaluation."""
  workdir = tmp_path / "mlp"
  overrides = ["--config.model.head=flatten_mlp", "--config.caf.weights=gradcam",
               "--config.caf.loss_kind=weighted_features"]
  refused = _main(tmp_path / "refused", "--config.model.head=flatten_mlp")
  assert refused.returncode == 2 and "caf.weights" in refused.stderr
  assert not (tmp_path / "refused").exists()
  result = _main(workdir, *overrides)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((workdir / "report.json").read_text())
  assert report["config"]["model"]["head"] == "flatten_mlp"
  assert report["config"]["caf"]["weights"] == "gradcam"
  accuracy = {(r["attack"], r["defense"]): r["accuracy"] for r in report["results"]
              if r["threat_model"] == "unseen"}
  assert {("none", "cafd"), ("caf", "none"), ("caf", "cafd")} <= set(accuracy)
  # Two tiny epochs leave this classifier near chance, so only the plumbing is checked here;
  # docs/ablations.md measures a trained flatten_mlp classifier on the quickstart.
  assert all(0.0 <= value <= 1.0 for value in accuracy.values())
  assert os.listdir(workdir / "checkpoints" / "denoiser") and os.listdir(workdir / "craft")


def test_report_stage_without_a_report_fails_cleanly(tmp_path):
  result = _main(tmp_path / "empty", "--config.stages=report")
  assert result.returncode == 2
  assert result.stderr.strip().startswith("error: ") and "run the evaluate stage" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


def _classifier_leaves(workdir):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from cafd_jax import pipeline  # pylint: disable=g-import-not-at-top
  variables = pipeline.restore_classifier(tiny.get_config(), str(workdir), 10)
  return [np.asarray(leaf) for leaf in jax.tree.leaves(variables)]


def test_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path):
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  overrides = ["--config.stages=train_classifier", "--config.classifier.num_epochs=4"]
  straight = tmp_path / "straight"
  assert _main(straight, *overrides).returncode == 0
  killed = tmp_path / "killed"
  command = [sys.executable, "main.py", "--config", "configs/tiny.py", "--workdir", str(killed),
             *overrides]
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first_checkpoint = killed / "checkpoints" / "classifier" / "6"  # steps: 300 // 50 an epoch
  deadline = time.time() + 300
  while not first_checkpoint.exists() and process.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert first_checkpoint.exists() and not (killed / "checkpoints" / "classifier" / "24").exists()
  result = _main(killed, *overrides)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resuming after epoch" in result.stdout
  for got, want in zip(_classifier_leaves(killed), _classifier_leaves(straight)):
    np.testing.assert_array_equal(got, want)
