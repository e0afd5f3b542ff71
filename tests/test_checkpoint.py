"""Interrupted training resumes to exactly the uninterrupted result; bad checkpoints fail clearly."""

import os

import jax
import numpy as np
import pytest

from cafd_jax import checkpoint, data, factory
from cafd_jax.train import classifier, loop


class Interrupted(Exception):
  pass


def _fit(config, directory, step_fn):
  dataset = data.make_synthetic(120, seed=5)
  state = factory.classifier_state(config, 10, jax.random.key(0), steps_per_epoch=4)
  return loop.fit(stage="test", state=state, step_fn=step_fn,
                  arrays=(dataset.images, dataset.labels), batch_size=30, num_epochs=3, seed=0,
                  key=jax.random.key(1), checkpoint_dir=directory, workdir=None)


def test_resume_after_interruption_matches_uninterrupted(tiny_config, tmp_path):
  step_fn = classifier.make_step_fn(use_augmentation=True)
  reference = _fit(tiny_config, str(tmp_path / "straight"), step_fn)

  calls = {"n": 0}

  def dying_step(state, batch, key):
    calls["n"] += 1
    if calls["n"] == 7:  # in the middle of the second epoch, after the first checkpoint
      raise Interrupted
    return step_fn(state, batch, key)

  with pytest.raises(Interrupted):
    _fit(tiny_config, str(tmp_path / "resumed"), dying_step)
  checkpoints = checkpoint.manager(str(tmp_path / "resumed"))
  assert checkpoints.latest_step() == 1
  checkpoints.close()
  resumed = _fit(tiny_config, str(tmp_path / "resumed"), step_fn)
  for got, want in zip(jax.tree.leaves((resumed.params, resumed.batch_stats, resumed.opt_state)),
                       jax.tree.leaves((reference.params, reference.batch_stats, reference.opt_state))):
    np.testing.assert_array_equal(got, want)
  # A finished run restores and does no more steps.
  finished = _fit(tiny_config, str(tmp_path / "resumed"), dying_step)
  assert int(finished.step) == int(reference.step)


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
