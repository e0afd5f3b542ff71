"""Interrupted training resumes to exactly the uninterrupted result; bad checkpoints fail clearly."""

import os

import jax
import numpy as np
import pytest

from cafd_jax import checkpoint, data, factory
from cafd_jax.train import classifier, loop


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


def _fit(config, directory, die_at=None):
  dataset = data.make_synthetic(120, seed=5)
  images = dataset.images if die_at is None else DyingImages(dataset.images, die_at)
  state = factory.classifier_state(config, 10, jax.random.key(0), steps_per_epoch=4)
  return loop.fit(stage="test", state=state,
                  step_fn=classifier.make_step_fn(use_augmentation=True),
                  arrays=(images, dataset.labels), batch_size=30, num_epochs=3, seed=0,
                  key=jax.random.key(1), checkpoint_dir=directory, workdir=None,
                  prefetch_batches=0)


def test_resume_after_interruption_matches_uninterrupted(tiny_config, tmp_path):
  reference = _fit(tiny_config, str(tmp_path / "straight"))
  with pytest.raises(Interrupted):  # in the middle of the second epoch, after the first checkpoint
    _fit(tiny_config, str(tmp_path / "resumed"), die_at=7)
  checkpoints = checkpoint.manager(str(tmp_path / "resumed"))
  assert checkpoints.latest_step() == 1
  checkpoints.close()
  resumed = _fit(tiny_config, str(tmp_path / "resumed"))
  for got, want in zip(jax.tree.leaves((resumed.params, resumed.batch_stats, resumed.opt_state)),
                       jax.tree.leaves((reference.params, reference.batch_stats, reference.opt_state))):
    np.testing.assert_array_equal(got, want)
  # A finished run restores and does no more steps.
  finished = _fit(tiny_config, str(tmp_path / "resumed"), die_at=1)
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
