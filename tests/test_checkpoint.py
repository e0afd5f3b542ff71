"""Interrupted or budget-cut training resumes to exactly the uninterrupted result; bad checkpoints
fail clearly."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cafd_jax import budget, checkpoint, data, factory
from cafd_jax.train import classifier, loop
from conftest import ROOT


class Interrupted(Exception):
  pass


class DyingImages:
  """Images that raise ``Interrupted`` when batch number ``die_at`` (from 1) is read."""

  def __init__(self, images, die_at):
    self.images, self.die_at, self.reads = images, die_at, 0

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    self.reads += 1
    if self.reads == self.die_at:
      raise Interrupted
    return self.images[index]


def _fit(config, directory, die_at=None, time_budget=None, prefetch_batches=0):
  dataset = data.make_synthetic(120, seed=5)
  images = dataset.images if die_at is None else DyingImages(dataset.images, die_at)
  state = factory.classifier_state(config, 10, jax.random.key(0), steps_per_epoch=4)
  return loop.fit(stage="test", state=state,
                  step_fn=classifier.make_step_fn(use_augmentation=True),
                  arrays=(images, dataset.labels), batch_size=30, num_epochs=3, seed=0,
                  key=jax.random.key(1), checkpoint_dir=directory, workdir=None,
                  prefetch_batches=prefetch_batches, budget=time_budget)


def _assert_same_state(got, want):
  for a, b in zip(jax.tree.leaves((got.params, got.batch_stats, got.opt_state)),
                  jax.tree.leaves((want.params, want.batch_stats, want.opt_state))):
    np.testing.assert_array_equal(a, b)


def _ticks():
  """A clock that advances one second per reading."""
  ticks = iter(range(10**6))
  return lambda: float(next(ticks))


def test_resume_after_interruption_matches_uninterrupted(tiny_config, tmp_path):
  reference = _fit(tiny_config, str(tmp_path / "straight"))
  with pytest.raises(Interrupted):  # in the middle of the second epoch, after the first checkpoint
    _fit(tiny_config, str(tmp_path / "resumed"), die_at=7)
  assert checkpoint.latest_step(str(tmp_path / "resumed")) == 4  # numbered by steps done
  resumed = _fit(tiny_config, str(tmp_path / "resumed"))
  _assert_same_state(resumed, reference)
  # A finished run restores and does no more steps.
  finished = _fit(tiny_config, str(tmp_path / "resumed"), die_at=1)
  assert int(finished.step) == int(reference.step)


def test_budget_cuts_training_mid_epoch_and_a_rerun_continues_to_the_same_result(
    tiny_config, tmp_path, capsys):
  reference = _fit(tiny_config, str(tmp_path / "straight"))
  directory = str(tmp_path / "cut")
  # One clock reading at the start, one per step: spent after the third of 4 steps per epoch.
  cut = budget.Budget(2.5, clock=_ticks())
  state = _fit(tiny_config, directory, time_budget=cut, prefetch_batches=2)
  assert int(state.step) == 3 and checkpoint.latest_step(directory) == 3
  assert cut.record()["cut"] and cut.cuts == [{"stage": "test", "epoch": "1/3", "step": "3/12"}]
  assert "stopped after step 3/4 of epoch 1/3" in capsys.readouterr().out
  resumed = _fit(tiny_config, directory, time_budget=budget.Budget(0))
  assert "resuming after step 3/4 of epoch 1/3" in capsys.readouterr().out
  _assert_same_state(resumed, reference)
  # A budget spent on the last step cuts nothing: training was complete.
  last = budget.Budget(11.5, clock=_ticks())
  _fit(tiny_config, str(tmp_path / "whole"), time_budget=last)
  assert not last.cuts


def test_checkpoints_numbered_by_epochs_still_resume(tiny_config, tmp_path):
  """Checkpoints written before budgets existed were numbered by epochs done."""
  reference = _fit(tiny_config, str(tmp_path / "straight"))
  directory = tmp_path / "old"
  with pytest.raises(Interrupted):  # after the first epoch's checkpoint (step 4)
    _fit(tiny_config, str(directory), die_at=7)
  os.rename(directory / "4", directory / "1")  # as the old numbering named it
  _assert_same_state(_fit(tiny_config, str(directory)), reference)


def test_corrupt_checkpoint_gives_one_clear_line(tiny_config, tmp_path):
  directory = str(tmp_path / "ckpt")
  state = factory.classifier_state(tiny_config, 10, jax.random.key(0), steps_per_epoch=1)
  checkpoints = checkpoint.manager(directory)
  checkpoint.save(checkpoints, 1, state)
  checkpoints.close()
  for root, _, files in os.walk(os.path.join(directory, "1")):
    for name in files:
      if name != "commit_success.txt" and not name.startswith("_"):
        with open(os.path.join(root, name), "wb") as file:
          file.write(b"garbage")
  with pytest.raises(checkpoint.CheckpointError) as error:
    checkpoint.require_latest(directory, state, "classifier")
  message = str(error.value)
  assert "\n" not in message and "unreadable" in message and directory in message


def test_missing_checkpoint_says_which_stage_to_run(tiny_config, tmp_path):
  state = factory.classifier_state(tiny_config, 10, jax.random.key(0), steps_per_epoch=1)
  with pytest.raises(checkpoint.CheckpointError, match="run its training stage first"):
    checkpoint.require_latest(str(tmp_path / "none"), state, "classifier")


_LEFT_OVER_READ = """
import sys
from cafd_jax import checkpoint
if sys.argv[1] == "after_failed_restore":
  checkpoint._drop_closed_loop_errors()
async def read():
  pass
pending = read()  # what a failed restore's unstarted read leaves until exit
"""


@pytest.mark.parametrize("after_failed_restore", [False, True])
def test_unawaited_reads_of_a_failed_restore_print_nothing_at_exit(after_failed_restore):
  """Python reports a never-awaited coroutine at exit; after a restore this must stay silent."""
  argument = "after_failed_restore" if after_failed_restore else "plain"
  result = subprocess.run([sys.executable, "-c", _LEFT_OVER_READ, argument],
                          cwd=ROOT, capture_output=True, text=True, check=True, timeout=120)
  assert ("was never awaited" in result.stderr) is not after_failed_restore, result.stderr
