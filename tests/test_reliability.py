"""Nothing lost: one writer per workdir, no config drift, damaged checkpoints skipped,
non-finite training stopped, failed writes named, no traceback on error paths (issue 25)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafd_jax import checkpoint, factory, io_utils
from cafd_jax import workdir as workdir_guard
from cafd_jax.train import loop

from conftest import ROOT, run_main


def _corrupt(step_dir) -> None:
  """Overwrites every data file of one Orbax checkpoint with garbage (its markers kept)."""
  for root, _, files in os.walk(step_dir):
    for name in files:
      if name != "commit_success.txt" and not name.startswith("_"):
        with open(os.path.join(root, name), "wb") as file:
          file.write(b"garbage")


def _copy(finished_run, tmp_path, name="copy"):
  workdir, _ = finished_run
  copy = tmp_path / name
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(workdir_guard.LOCK_FILE))
  return copy


def _files(directory):
  return {str(path.relative_to(directory)): path.stat().st_mtime_ns
          for path in directory.rglob("*") if path.is_file()}


# --- One writer per workdir -------------------------------------------------------------------

def test_a_second_run_on_a_locked_workdir_stops_at_once_naming_the_holder(tmp_path):
  workdir = tmp_path / "work"
  lock = workdir_guard.Lock(str(workdir))
  lock.acquire()
  try:
    started = time.perf_counter()
    result = run_main(workdir)
    elapsed = time.perf_counter() - started
  finally:
    lock.release()
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"error: {workdir} is in use by process {os.getpid()} (another main.py run); wait for it "
      f"to finish or use another --workdir."]
  assert "[pipeline]" not in result.stdout and elapsed < 60  # before any data or stage
  assert sorted(os.listdir(workdir)) == [workdir_guard.LOCK_FILE]


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
  workdir = tmp_path / "work"
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
       "from cafd_jax import workdir; lock = workdir.Lock(sys.argv[2]); lock.acquire(); "
       "print('held', "
       "flush=True); time.sleep(600)", str(ROOT), str(workdir)],
      stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(workdir_guard.WorkdirError, match=f"in use by process {holder.pid}"):
    workdir_guard.Lock(str(workdir)).acquire()
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  lock = workdir_guard.Lock(str(workdir))
  lock.acquire()  # the kernel released the killed holder's lock
  assert (workdir / workdir_guard.LOCK_FILE).read_text().strip() == str(os.getpid())
  lock.release()


# --- Configuration drift ------------------------------------------------------------------------

def test_drift_lists_meaningful_fields_only():
  stored = {"seed": 0, "model": {"name": "vgg_tiny", "width": 0.25}, "eval": {"attacks": "pgd"},
            "craft": {"steps": 2, "eps": 0.03}, "max_seconds": {"craft": 0.0},
            "data": {"source": "synthetic"}}
  changed = json.loads(json.dumps(stored))
  changed["eval"]["attacks"], changed["max_seconds"]["craft"] = "pgd,cw", 60.0
  assert workdir_guard.drift(stored, changed) == []  # the grid and budgets change freely
  changed["model"]["width"], changed["craft"]["steps"], changed["seed"] = 0.5, 3, 1
  changed["data"]["new_field"] = True  # a field the stored config predates does not count
  assert workdir_guard.drift(stored, changed) == [
      "seed: 0 -> 1", "model.width: 0.25 -> 0.5", "craft.steps: 2 -> 3"]


def test_drift_reads_a_field_the_stored_config_predates_as_its_legacy_value():
  stored = {"model": {"name": "airbench94", "width": 1.0}}  # recorded before whiten_padding
  current = {"model": {"name": "airbench94", "width": 1.0, "whiten_padding": "valid"}}
  assert workdir_guard.drift(stored, current) == ["model.whiten_padding: 'same' -> 'valid'"]
  current["model"]["whiten_padding"] = "same"
  assert workdir_guard.drift(stored, current) == []
  vgg = {"model": {"name": "vgg_tiny", "width": 1.0}}  # the field means nothing for it
  assert workdir_guard.drift(vgg, {"model": {**vgg["model"], "whiten_padding": "valid"}}) == []


def test_rerun_with_another_model_stops_before_writing_anything(finished_run, tmp_path):
  copy = _copy(finished_run, tmp_path)
  before = _files(copy)
  config_text = (copy / "config.json").read_bytes()
  result = run_main(copy, "--config.model.width=1.0", "--config.denoiser.num_epochs=2")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
  assert lines[0] == (f"error: {copy} holds output of another config (model.width: 0.25 -> "
                      f"1.0; denoiser.num_epochs: 1 -> 2); use another --workdir, or rerun with "
                      f"{copy / 'config.json'}'s values.")
  assert (copy / "config.json").read_bytes() == config_text
  after = _files(copy)
  after.pop(workdir_guard.LOCK_FILE)
  assert after == before  # nothing written, nothing touched
  # The finished run still loads as it is.
  from cafd_jax import api  # pylint: disable=g-import-not-at-top
  assert api.load(str(copy)).config.model.width == 0.25


def test_a_checkpoint_of_another_model_is_named_as_such_not_as_damaged(tiny_config, tmp_path):
  directory = str(tmp_path / "ckpt")
  state = factory.classifier_state(tiny_config, 10, jax.random.key(0), steps_per_epoch=1)
  checkpoints = checkpoint.manager(directory)
  checkpoint.save(checkpoints, 1, state)
  checkpoints.close()
  tiny_config.model.width = 0.5
  other = factory.classifier_state(tiny_config, 10, jax.random.key(0), steps_per_epoch=1)
  with pytest.raises(checkpoint.CheckpointError, match="does not fit the model this config "
                     "builds") as error:
    checkpoint.require_latest(directory, other, "classifier")
  assert "delete" not in str(error.value) and os.listdir(os.path.join(directory, "1"))


# --- Damaged checkpoints -------------------------------------------------------------------------

def _fit(config, directory, step_fn=None, state=None, num_epochs=3):
  from cafd_jax import data  # pylint: disable=g-import-not-at-top
  from cafd_jax.train import classifier  # pylint: disable=g-import-not-at-top
  dataset = data.make_synthetic(120, seed=5)
  if state is None:
    state = factory.classifier_state(config, 10, jax.random.key(0), steps_per_epoch=4)
  return loop.fit(stage="test", state=state,
                  step_fn=step_fn or classifier.make_step_fn(use_augmentation=True),
                  arrays=(dataset.images, dataset.labels), batch_size=30, num_epochs=num_epochs,
                  seed=0, key=jax.random.key(1), checkpoint_dir=directory, workdir=None,
                  prefetch_batches=0)


def test_a_damaged_latest_checkpoint_falls_back_and_training_reproduces_the_result(
    tiny_config, tmp_path, capsys):
  reference = _fit(tiny_config, str(tmp_path / "straight"))
  directory = tmp_path / "resumed"
  _fit(tiny_config, str(directory))  # keeps steps 8 and 12
  _corrupt(directory / "12")
  capsys.readouterr()
  resumed = _fit(tiny_config, str(directory))
  out = capsys.readouterr().out
  moved = f"{directory}.damaged-12"
  assert (f"[checkpoint] warning: {directory}/12 is unreadable (ValueError); skipped; moved to "
          f"{moved}, nothing deleted") in out
  assert "resuming after epoch 2/3" in out
  assert os.listdir(moved) and checkpoint.latest_step(str(directory)) == 12
  for got, want in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(reference.params)):
    np.testing.assert_array_equal(got, want)


def test_damage_is_named_by_its_builtin_class():
  """Which file of a damaged checkpoint fails first varies by file system (seen in CI: a JSON
  file, JSONDecodeError; here: an array, ValueError); the message names the stable kind."""
  assert checkpoint._error_kind(json.JSONDecodeError("bad", "garbage", 0)) == "ValueError"

  class StoreMissing(FileNotFoundError):
    pass

  assert checkpoint._error_kind(StoreMissing()) == "FileNotFoundError"


def test_readers_skip_a_damaged_checkpoint_and_stop_only_when_none_is_intact(
    tiny_config, tmp_path, capsys):
  directory = tmp_path / "ckpt"
  state = factory.classifier_state(tiny_config, 10, jax.random.key(0), steps_per_epoch=1)
  checkpoints = checkpoint.manager(str(directory))
  for step in (1, 2):
    checkpoint.save(checkpoints, step, state.replace(step=step))
  checkpoints.close()
  _corrupt(directory / "2")
  restored = checkpoint.require_latest(str(directory), state, "classifier")
  assert int(restored.step) == 1
  assert capsys.readouterr().out.strip() == (
      f"[checkpoint] warning: {directory}/2 is unreadable (ValueError); skipped, nothing deleted")
  assert os.listdir(directory / "2")  # a reader moves nothing
  _corrupt(directory / "1")
  with pytest.raises(checkpoint.CheckpointError) as error:
    checkpoint.require_latest(str(directory), state, "classifier")
  assert str(error.value) == (
      f"Every checkpoint in {directory} is unreadable (steps 2 (ValueError), 1 (ValueError)); "
      f"move {directory} aside to retrain that stage, or use another --workdir.")


def test_main_with_damaged_checkpoints_prints_no_traceback(finished_run, tmp_path):
  copy = _copy(finished_run, tmp_path)
  classifier_dir = copy / "checkpoints" / "classifier"
  steps = sorted(int(name) for name in os.listdir(classifier_dir) if name.isdigit())
  _corrupt(classifier_dir / str(steps[-1]))
  result = run_main(copy, "--config.stages=evaluate", "--config.eval.attacks=none")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"{classifier_dir}/{steps[-1]} is unreadable" in result.stdout
  assert "Traceback" not in result.stderr and "Event loop" not in result.stderr, result.stderr
  for step in steps:
    _corrupt(classifier_dir / str(step))
  result = run_main(copy, "--config.stages=evaluate", "--config.eval.attacks=none")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"error: Every checkpoint in {classifier_dir} is unreadable (steps "
      f"{', '.join(f'{step} (ValueError)' for step in reversed(steps))}); move {classifier_dir} "
      f"aside to retrain that stage, or use another --workdir."], result.stderr


# --- Non-finite values -----------------------------------------------------------------------

def _counting_step(bad_step: int, where: str):
  """A train step over {"w", "step"} whose loss (or state) turns NaN at ``bad_step`` (from 1)."""
  def step_fn(state, batch, key, frozen):
    del batch, key, frozen
    step = state["step"] + 1
    bad = step == bad_step
    w = state["w"] + 1.0
    if where == "state":
      w = jnp.where(bad, jnp.nan, w)
    loss = jnp.where(bad & (where == "loss"), jnp.nan, 1.0)
    return {"w": w, "step": step}, {"loss": loss, "accuracy": jnp.float32(0.5)}
  return step_fn


@pytest.mark.parametrize("where, bad_step, last_good", [("loss", 6, 4), ("state", 8, 4)])
def test_a_non_finite_loss_or_state_stops_without_saving_it(tiny_config, tmp_path, where,
                                                            bad_step, last_good):
  directory = str(tmp_path / "ckpt")
  state = {"w": jnp.zeros(3), "step": jnp.int32(0)}
  with pytest.raises(loop.NonFiniteError) as error:
    _fit(tiny_config, directory, _counting_step(bad_step, where), state)
  what = ("non-finite loss" if where == "loss" else
          "non-finite parameters or optimiser state (a non-finite gradient)")
  assert str(error.value) == (
      f"test stopped at step {bad_step}: {what}; this state is not saved and the last "
      f"checkpoint (step {last_good}) is kept. Lower the learning rate or check the data, "
      f"then rerun.")
  assert checkpoint.latest_step(directory) == last_good
  restored = checkpoint.require_latest(directory, state, "test")
  assert np.all(np.isfinite(restored["w"]))


def test_main_reports_a_non_finite_loss_in_one_line(tmp_path):
  result = run_main(tmp_path / "work", "--config.stages=train_classifier",
                    "--config.classifier.learning_rate=1e30")
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: train_classifier stopped at step "), \
      result.stderr
  assert "non-finite" in lines[0]


# --- Failed writes ---------------------------------------------------------------------------

def test_a_failed_write_keeps_the_earlier_file_and_names_the_file(tmp_path):
  path = tmp_path / "report.json"
  io_utils.write_text(str(path), "earlier\n")

  def full_disk(file):
    file.write(b"half")
    raise OSError(28, "No space left on device")

  with pytest.raises(io_utils.WriteError) as error:
    io_utils.write_atomically(str(path), full_disk)
  assert str(error.value) == (f"cannot write {path} (No space left on device); the files "
                              f"written before are intact")
  assert path.read_text() == "earlier\n" and os.listdir(tmp_path) == ["report.json"]


def test_a_failed_checkpoint_write_keeps_the_earlier_checkpoints(tiny_config, tmp_path,
                                                                 monkeypatch):
  directory = str(tmp_path / "ckpt")
  state = factory.classifier_state(tiny_config, 10, jax.random.key(0), steps_per_epoch=1)
  checkpoints = checkpoint.manager(directory)
  checkpoint.save(checkpoints, 1, state)

  def failing_save(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(checkpoints, "save", failing_save)
  with pytest.raises(io_utils.WriteError, match=f"cannot write checkpoint {directory}/2 "):
    checkpoint.save(checkpoints, 2, state)
  checkpoints.close()
  assert checkpoint.latest_step(directory) == 1
  checkpoint.require_latest(directory, state, "classifier")


# --- Kill anywhere -------------------------------------------------------------------------------

def _run_and_kill(workdir, overrides, markers: str | tuple[str, ...],
                  delay: float) -> str | None:
  """Starts main.py; once a stdout line starts with one of ``markers``, waits ``delay`` seconds
  and sends SIGKILL. The marker that fired, or None if the run ended first."""
  markers = (markers,) if isinstance(markers, str) else markers
  command = [sys.executable, "main.py", "--config", "configs/tiny.py", "--workdir", str(workdir),
             *overrides]
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
  for line in process.stdout:
    fired = next((marker for marker in markers if line.startswith(marker)), None)
    if fired:
      time.sleep(delay)
      process.send_signal(signal.SIGKILL)
      process.wait()
      return fired if process.returncode == -signal.SIGKILL else None
  process.wait()
  return None


def _leaves(workdir):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from cafd_jax import pipeline  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  trees = [pipeline.restore_classifier(config, str(workdir), 10)]
  for name in ("cafd", "pixel"):
    if (workdir / pipeline.denoiser_dir(name)).exists():
      trees.append(pipeline.restore_denoiser(config, str(workdir), name))
  return [np.asarray(leaf) for leaf in jax.tree.leaves(trees)]


def _rows(workdir):
  return json.loads((workdir / "report.json").read_text())["results"]


def test_evaluation_killed_mid_grid_keeps_finished_runs_and_gives_the_same_report(
    finished_run, tmp_path):
  """The default suite's kill: SIGKILL during the second attack run of the grid."""
  workdir, _ = finished_run
  copy = _copy(finished_run, tmp_path)
  os.remove(copy / "eval_runs.json")
  os.remove(copy / "report.json")
  overrides = ["--config.stages=evaluate"]
  assert _run_and_kill(copy, overrides, "[evaluate]", 0.2)
  kept = json.loads((copy / "eval_runs.json").read_text())
  assert 1 <= len(kept) < 3  # the grid has three runs: none, pgd, caf
  result = run_main(copy, *overrides)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count("kept from an earlier run") == len(kept)
  assert _rows(copy) == _rows(workdir)


# (stage, the line that starts its progress output), in pipeline order. Each stage is aimed at
# twice, each time in a fresh invocation killed at a seeded random delay after the first such
# line (the second resumes the stage from where the first kill left it). A stage may end
# within the delay (the tiny craft stage can); the next aim at it then finds it complete, so
# that invocation is killed at the first progress line of the stage it is in.
STAGE_MARKERS = (
    ("train_classifier", "[train_classifier] step"),
    ("craft", "[craft] chunk"),
    ("train_denoiser", "[train_denoiser] step"),
    ("train_baselines", "[train_pixel_denoiser] step"),
    ("evaluate", "[evaluate]"),
)
KILL_POINTS = tuple((stage, marker) for stage, marker in STAGE_MARKERS for _ in range(2))


@pytest.mark.slow  # about a dozen tiny pipelines (~5 min on 2 cores); `pytest -m slow`
def test_sigkill_anywhere_then_rerun_reproduces_the_uninterrupted_run(tmp_path):
  overrides = ["--config.eval.defenses=none,cafd,pixel", "--config.classifier.num_epochs=2",
               "--config.denoiser.num_epochs=2"]
  straight = tmp_path / "straight"
  result = run_main(straight, *overrides)
  assert result.returncode == 0, result.stderr[-3000:]
  killed_dir = tmp_path / "killed"
  rng = np.random.default_rng(25)
  killed = []
  stage_of = {marker: stage for stage, marker in STAGE_MARKERS}
  for stage, marker in KILL_POINTS:
    delay = float(rng.uniform(0.0, 0.5))
    later = tuple(m for _, m in STAGE_MARKERS[[s for s, _ in STAGE_MARKERS].index(stage):])
    fired = _run_and_kill(killed_dir, overrides, later, delay)
    if fired:
      killed.append((stage_of[fired], round(delay, 3)))
  print("killed at:", killed)
  assert {stage for stage, _ in killed} == set(stage_of.values()), killed
  result = run_main(killed_dir, *overrides)
  assert result.returncode == 0, result.stderr[-3000:]
  for got, want in zip(_leaves(killed_dir), _leaves(straight), strict=True):
    np.testing.assert_array_equal(got, want)
  assert _rows(killed_dir) == _rows(straight)


# --- Clean exits -------------------------------------------------------------------------------

def test_a_normal_run_writes_nothing_to_stderr_but_warnings(finished_run):
  _, result = finished_run
  assert "Traceback" not in result.stderr and "Error" not in result.stderr, result.stderr[-3000:]


def test_ctrl_c_ends_with_one_line_and_exit_code_130(tmp_path):
  command = [sys.executable, "main.py", "--config", "configs/tiny.py", "--workdir",
             str(tmp_path / "work"), "--config.stages=train_classifier",
             "--config.classifier.num_epochs=500"]  # still running when the signal comes
  # A shell's background job (CI's, for one) starts with SIGINT ignored, and a child inherits
  # that; a handler (here Python's own) is reset to the default in the child instead.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
  finally:
    signal.signal(signal.SIGINT, previous)
  for line in process.stdout:
    if line.startswith("[train_classifier] step"):
      process.send_signal(signal.SIGINT)
      break
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 130, stderr
  assert stderr.strip().splitlines() == [
      "interrupted; the same command resumes from the last checkpoint"], stderr
