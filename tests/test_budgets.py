"""Stage time budgets: every stage kind cut by its budget, and the same command with more time
continuing to what an uninterrupted run gives."""

import json
import os

import jax
import numpy as np
import pytest

from cafd_jax import budget, data, factory, pipeline
from cafd_jax.train import classifier, loop
from configs import tiny

from conftest import run_main


def _ticks():
  ticks = iter(range(10**6))
  return lambda: float(next(ticks))


def test_budget_reading_sharing_and_records(tmp_path):
  unlimited = budget.Budget(0)
  assert not unlimited.limited and not unlimited.spent() and unlimited.remaining() == float("inf")
  assert unlimited.share(3) is unlimited
  clocked = budget.Budget(10, clock=_ticks())  # start reads 0
  assert clocked.remaining() == 9  # reads 1
  part = clocked.share(2)  # reads 2 (8 s left), the part reads 3 at its start: 4 s of its own
  assert part.max_seconds == 4 and part.limited
  part.cut(stage="a", step="1/3")
  assert clocked.cuts == [{"stage": "a", "step": "1/3"}]  # recorded on the whole budget
  spent = budget.Budget(1, clock=_ticks())
  spent.elapsed(), spent.elapsed()
  assert spent.spent() and spent.share(2).limited and spent.share(2).spent()
  record = clocked.record()
  assert record["cut"] and record["max_seconds"] == 10
  assert budget.describe(record) == "budget 10s; cut at stage a, step 1/3"
  assert budget.describe(budget.Budget(0).record()) == "no budget"
  budget.write_record(str(tmp_path), "evaluate", {"x": 1})
  budget.write_record(str(tmp_path), "craft", {"y": 2})
  assert list(budget.read_records(str(tmp_path))) == ["craft", "evaluate"]  # pipeline order
  (tmp_path / budget.STAGES_FILE).write_text("{not json")
  assert budget.read_records(str(tmp_path)) == {}


def test_epochs_within_keeps_whole_epochs_between_one_and_the_plan():
  assert budget.epochs_within(1000, 1.0, 10, planned=9) == 9  # fits: unchanged
  assert budget.epochs_within(100, 1.0, 10, planned=9) == 9  # 95 s: 9 epochs of 10 s
  assert budget.epochs_within(60, 1.0, 10, planned=9) == 5  # 57 s
  assert budget.epochs_within(5, 1.0, 10, planned=9) == 1  # never below one epoch
  fitted = budget.Budget(10, clock=_ticks())
  fitted.share(2).fit(stage="train_hgd_denoiser", epochs="3/10")  # recorded on the whole
  assert fitted.record()["fitted"] == [{"stage": "train_hgd_denoiser", "epochs": "3/10"}]
  assert budget.describe(fitted.record()) == "budget 10s; train_hgd_denoiser fitted to 3/10 epochs"
  assert "fitted" not in budget.Budget(10).record()


def test_time_steps_times_the_compiled_step_and_leaves_the_state_as_it_was(tiny_config):
  dataset = data.make_synthetic(60, seed=5)
  state = factory.classifier_state(tiny_config, 10, jax.random.key(0), steps_per_epoch=2)
  before = [np.asarray(leaf) for leaf in jax.tree.leaves(state)]
  first, per_step = loop.time_steps(state=state, step_fn=classifier.make_step_fn(True),
                                    arrays=(dataset.images, dataset.labels), batch_size=30,
                                    key=jax.random.key(1), seed=0, steps=2)
  assert first > 0 and per_step > 0
  for got, want in zip(jax.tree.leaves(state), before):
    np.testing.assert_array_equal(got, want)


def test_fitted_shortens_the_schedule_once_and_keeps_the_plan(tiny_config, tmp_path,
                                                              monkeypatch):
  directory = str(tmp_path / "checkpoints" / "classifier")
  tiny_config.classifier.num_epochs = 9
  stage_budget = budget.Budget(60, clock=_ticks())
  timings = []

  def time_steps():
    timings.append(1)
    return 2.0, 1.0  # 2 s for the compiled first step, then 1 s a step

  same = pipeline.fitted(tiny_config, "classifier", "s", directory, stage_budget, 10, time_steps)
  assert same is tiny_config and not timings  # fit_epochs_to_budget is off
  tiny_config.fit_epochs_to_budget = True
  assert pipeline.fitted(tiny_config, "classifier", "s", directory, budget.Budget(0), 10,
                         time_steps) is tiny_config  # no budget
  shorter = pipeline.fitted(tiny_config, "classifier", "s", directory, stage_budget, 10,
                            time_steps)
  # 59 s left at the timing, 57 s once compiled, 54.2 s with the margin: 5 epochs of 10 s.
  assert shorter.classifier.num_epochs == 5 and tiny_config.classifier.num_epochs == 9
  assert stage_budget.fits == [{"stage": "s", "epochs": "5/9"}] and len(timings) == 1
  plan = json.loads((tmp_path / "checkpoints" / "classifier.plan.json").read_text())
  assert plan["epochs"] == 5 and plan["planned_epochs"] == 9
  monkeypatch.setattr(pipeline.checkpoint, "latest_step", lambda _: 10)  # the run has begun
  resumed = pipeline.fitted(tiny_config, "classifier", "s", directory, budget.Budget(10**6), 10,
                            time_steps)
  assert resumed.classifier.num_epochs == 5 and len(timings) == 1  # the plan, not a new timing
  os.remove(tmp_path / "checkpoints" / "classifier.plan.json")  # begun before plans existed
  assert pipeline.fitted(tiny_config, "classifier", "s", directory, stage_budget, 10,
                         time_steps) is tiny_config


def test_fitted_runs_keep_their_shorter_plan_when_resumed_with_time(tmp_path):
  workdir = tmp_path / "fitted"
  options = ["--config.fit_epochs_to_budget=True", "--config.denoiser.num_epochs=2"]
  first = run_main(workdir, "--config.stages=train_classifier",
                   "--config.max_seconds.train_classifier=0.001", *options)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "1 of 2 epochs fit" in first.stdout
  record = json.loads((workdir / budget.STAGES_FILE).read_text())["train_classifier"]
  assert record["fitted"] == [{"stage": "train_classifier", "epochs": "1/2"}]
  assert record["cut_at"] == [{"stage": "train_classifier", "epoch": "1/1", "step": "1/6"}]
  assert "fitted to 1/2 epochs; cut at" in first.stdout

  second = run_main(workdir, "--config.stages=train_classifier,craft,train_denoiser",
                    "--config.max_seconds.train_denoiser=0.001", *options)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "[train_classifier] resuming after step 1/6 of epoch 1/1" in second.stdout
  assert pipeline.classifier_step(tiny.get_config(), str(workdir)) == 6  # one epoch, as planned
  records = json.loads((workdir / budget.STAGES_FILE).read_text())
  assert records["train_classifier"]["fitted"] == [{"stage": "train_classifier", "epochs": "1/2"}]
  assert records["train_denoiser"]["fitted"] == [{"stage": "train_denoiser", "epochs": "1/2"}]
  plan = json.loads((workdir / "checkpoints" / "denoiser.plan.json").read_text())
  assert plan["epochs"] == 1 and plan["planned_epochs"] == 2 and plan["step_seconds"] > 0


def _leaves(variables):
  return [np.asarray(leaf) for leaf in jax.tree.leaves(variables)]


def test_every_stage_cut_then_the_same_command_with_time_reaches_the_uninterrupted_run(
    finished_run, tmp_path):
  straight, _ = finished_run
  workdir = tmp_path / "cut"
  budgets = [f"--config.max_seconds.{stage}=0.001"
             for stage in ("train_classifier", "craft", "train_denoiser", "evaluate")]
  cut = run_main(workdir, *budgets)
  assert cut.returncode == 0, cut.stderr[-3000:]
  stages = json.loads((workdir / "report.json").read_text())["metadata"]["stages"]
  assert stages == json.loads((workdir / budget.STAGES_FILE).read_text())
  assert stages["train_classifier"]["cut_at"] == [
      {"stage": "train_classifier", "epoch": "1/2", "step": "1/12"}]
  assert stages["craft"]["cut_at"] == [{"chunk": "1/3", "examples": "100/300"}]
  assert stages["train_denoiser"]["cut_at"] == [
      {"stage": "train_denoiser", "epoch": "1/1", "step": "1/2"}]
  assert stages["evaluate"]["cut_at"] == [
      {"model": "vgg_tiny", "round": "1/1", "run": "1/3", "next": "pgd unseen all"},
      {"figure": "cam_grid"}]
  assert not stages["train_baselines"]["cut"]  # nothing to train in the tiny config
  assert all(record["max_seconds"] == 0.001 for name, record in stages.items()
             if name != "train_baselines")
  assert not json.loads((workdir / "report.json").read_text())["metadata"]["partial"]
  rows = json.loads((workdir / "report.json").read_text())["results"]
  assert {(row["attack"], row["defense"]) for row in rows} == {("none", "none"), ("none", "cafd")}
  assert "[pipeline] craft took" in cut.stdout and "cut at chunk 1/3" in cut.stdout
  assert "training on the 100 of 300 examples crafted" in cut.stdout

  resumed = run_main(workdir)  # the same command, no budgets
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "[train_classifier] resuming after step 1/6 of epoch 1/2" in resumed.stdout
  for moved in ("craft.superseded-1", "checkpoints/denoiser.superseded-1"):
    assert (workdir / moved).is_dir() and f"moved to {workdir / moved}" in resumed.stdout
  assert len(os.listdir(workdir / "craft.superseded-1")) == 2  # settings + the one chunk: kept
  want = json.loads((straight / "report.json").read_text())["results"]
  assert json.loads((workdir / "report.json").read_text())["results"] == want
  stages = json.loads((workdir / "report.json").read_text())["metadata"]["stages"]
  assert not any(record["cut"] for record in stages.values())
  config = tiny.get_config()
  for restore in (lambda w: pipeline.restore_classifier(config, str(w), 10),
                  lambda w: pipeline.restore_denoiser(config, str(w))):
    for got, expected in zip(_leaves(restore(workdir)), _leaves(restore(straight))):
      np.testing.assert_array_equal(got, expected)
  assert (workdir / "figures" / "cam_grid.png").exists()


def test_budget_config_values_are_checked(tmp_path):
  for override, words in (("--config.max_seconds.craft=-1", "config.max_seconds.craft must be >= 0"),
                          ("--config.classifier.schedule=cosine", "config.classifier.schedule"),
                          ("--config.eval.adaptive_attacks=pgd,nope", "unknown 'nope'")):
    result = run_main(tmp_path / "never", override)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("kind", ["piecewise", "one_cycle"])
def test_schedules(kind):
  from cafd_jax.train import common  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.classifier.schedule = kind
  config.classifier.learning_rate = 0.4
  config.classifier.num_epochs = 10
  config.classifier.lr_decay_epochs = (5,)
  schedule = common.schedule(config.classifier, steps_per_epoch=10)
  rates = np.asarray([schedule(step) for step in range(101)])
  if kind == "one_cycle":  # 0 -> 0.4 over the first 20 steps, back to 0 at step 100
    assert rates[0] == 0 and rates[20] == pytest.approx(0.4) and rates[100] == pytest.approx(0)
    assert np.all(np.diff(rates[:21]) > 0) and np.all(np.diff(rates[20:]) < 0)
  else:
    assert rates[49] == pytest.approx(0.4) and rates[50] == pytest.approx(0.4 * 0.2)
