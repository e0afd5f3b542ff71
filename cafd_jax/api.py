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
  class_names: tuple[str, ...]  # label order of the logits

  def defended_logits(self, images: jnp.ndarray) -> jnp.ndarray:
    """Logits of the classifier behind the denoiser."""
    return self.classify(self.purify(images))


def load(workdir: str, denoiser: str = "cafd") -> Defended:
  """Restores the classifier and a denoiser (``cafd``, ``cafd_caf``, or a baseline: ``pixel``,
  ``hgd``)."""
  if denoiser not in evaluate.DENOISERS:
    raise ValueError(f"denoiser must be one of {evaluate.DENOISERS}, got {denoiser!r}.")
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise checkpoint.CheckpointError(f"No config.json in {workdir}; point api.load at the "
                                     f"--workdir of a main.py run.")
  with open(config_path) as file:
    config = ml_collections.ConfigDict(json.load(file))
  config_checks.validate(config)
  class_names = _class_names(workdir)
  num_classes = len(class_names)
  classifier = factory.classifier(config, num_classes)
  classify = evaluate.bind(jax.jit(classifier.apply),
                           pipeline.restore_classifier(config, workdir, num_classes))
  purify = evaluate.bind(jax.jit(factory.denoiser(config).apply),
                         pipeline.restore_denoiser(config, workdir, denoiser))
  return Defended(classify=classify, purify=purify, config=config,
                  class_names=class_names)


def _class_names(workdir: str) -> tuple[str, ...]:
  """Class names in label order, as the pipeline recorded them."""
  path = os.path.join(workdir, pipeline.CLASSES_FILE)
  if not os.path.exists(path):
    raise checkpoint.CheckpointError(f"No {pipeline.CLASSES_FILE} in {workdir}; point api.load at "
                                     f"the --workdir of a main.py run.")
  with open(path) as file:
    return tuple(json.load(file))
