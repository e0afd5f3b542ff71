"""Restore a trained CAFD pipeline from its workdir and use it as pure functions.

    from cafd_jax import api
    defended = api.load("/tmp/cafd-quickstart")
    logits = defended.classify(images)          # classifier alone, pixels in [0, 1], NHWC
    clean = defended.purify(images)             # CAFD denoiser
    logits = defended.classify(defended.purify(images))
"""

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from cafd_jax import checkpoint, config_checks, evaluate, factory, pipeline


@dataclasses.dataclass(frozen=True)
class Defended:
  """Jitted pure functions of a restored pipeline, and its config."""

  classify: Callable[[jnp.ndarray], jnp.ndarray]
  purify: Callable[[jnp.ndarray], jnp.ndarray]
  config: ml_collections.ConfigDict
  num_classes: int

  def defended_logits(self, images: jnp.ndarray) -> jnp.ndarray:
    """Logits of the classifier behind the denoiser."""
    return self.classify(self.purify(images))


def load(workdir: str) -> Defended:
  """Restores the classifier and denoiser checkpoints of ``workdir``."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise checkpoint.CheckpointError(f"No config.json in {workdir}; point api.load at the "
                                     f"--workdir of a main.py run.")
  with open(config_path) as file:
    config = ml_collections.ConfigDict(json.load(file))
  config_checks.validate(config)
  num_classes = _num_classes(config, workdir)
  classifier = factory.classifier(config, num_classes)
  classify = evaluate.logits_fn(classifier, pipeline.restore_classifier(config, workdir, num_classes))
  purify = evaluate.purify_fn(factory.denoiser(config), pipeline.restore_denoiser(config, workdir))
  return Defended(classify=jax.jit(classify), purify=jax.jit(purify), config=config,
                  num_classes=num_classes)


def _num_classes(config: ml_collections.ConfigDict, workdir: str) -> int:
  """Number of classes of the saved classifier, read from its checkpoint metadata."""
  directory = os.path.join(workdir, pipeline.CLASSIFIER_DIR)
  manager = checkpoint.manager(directory)
  step = manager.latest_step() if os.path.isdir(directory) else None
  if step is None:
    raise checkpoint.CheckpointError(f"No classifier checkpoint in {directory}; run the "
                                     f"train_classifier stage first.")
  metadata = manager.item_metadata(step)
  kernel = metadata.params["head"]["dense"]["kernel"]
  return int(kernel.shape[-1])
