"""Restore a trained CAFD pipeline from its workdir and use it as pure functions.

    from cafd_jax import api
    defended = api.load("/tmp/cafd-quickstart")
    logits = defended.classify(images)          # classifier alone, pixels in [0, 1], NHWC
    clean = defended.purify(images)             # CAFD denoiser
    logits = defended.classify(defended.purify(images))

Inputs are float pixels in [0, 1], NHWC, of the image size the run was trained on. Concrete
arrays are checked (rank, layout, size, dtype, finite, range) and a bad one raises ValueError
saying what was found; under ``jax.jit`` / ``jax.grad`` only the shape is checked, so attacks
can trace through. A batch of 0 images gives an empty result.
"""

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cafd_jax import checkpoint, config_checks, evaluate, factory, io_utils, pipeline
from cafd_jax import workdir as workdir_guard


def check_images(images: Any, image_size: int) -> jnp.ndarray:
  """``images`` as a float array [N, image_size, image_size, 3] in [0, 1], or ValueError."""
  if not hasattr(images, "shape"):
    images = np.asarray(images)
  shape = tuple(images.shape)
  expected = f"[N, {image_size}, {image_size}, 3] (NHWC)"
  if len(shape) != 4:
    raise ValueError(f"images must be a batch {expected}, got shape {shape}; add a batch axis "
                     f"with images[None] for one image.")
  if shape[1:] != (image_size, image_size, 3):
    hint = ("; this looks like NCHW: pass images.transpose(0, 2, 3, 1)"
            if shape[1] == 3 and shape[2:] == (image_size, image_size) else "")
    raise ValueError(f"images must be {expected}, got shape {shape}{hint}.")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images must be floating-point pixels in [0, 1], got dtype {images.dtype}"
                     f"{'; divide uint8 images by 255' if images.dtype == np.uint8 else ''}.")
  if isinstance(images, jax.core.Tracer) or shape[0] == 0:
    return images
  values = np.asarray(images)
  if not np.all(np.isfinite(values)):
    raise ValueError(f"images hold {int(np.sum(~np.isfinite(values)))} non-finite values "
                     f"(NaN or inf); pixels must be finite, in [0, 1].")
  low, high = float(values.min()), float(values.max())
  if low < 0.0 or high > 1.0:
    raise ValueError(f"images must be pixels in [0, 1], found values in [{low:g}, {high:g}]; "
                     f"divide 0-255 images by 255.")
  return images


def _checked(function: Callable, image_size: int, empty: Callable[[int], tuple]) -> Callable:
  """``function(images)`` after ``check_images``; an empty batch gives zeros of shape
  ``empty(0)`` without running the model."""
  def call(images):
    images = check_images(images, image_size)
    if images.shape[0] == 0:
      return jnp.zeros(empty(0), jnp.float32)
    return function(images)
  return call


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
  config = read_config(workdir)
  class_names = class_names_of(workdir)
  num_classes = len(class_names)
  classifier = factory.classifier(config, num_classes)
  size = config.data.image_size
  classify = evaluate.bind(jax.jit(classifier.apply),
                           pipeline.restore_classifier(config, workdir, num_classes))
  purify = evaluate.bind(jax.jit(factory.denoiser(config).apply),
                         pipeline.restore_denoiser(config, workdir, denoiser))
  return Defended(classify=_checked(classify, size, lambda n: (n, num_classes)),
                  purify=_checked(purify, size, lambda n: (n, size, size, 3)),
                  config=config, class_names=class_names)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The validated config a main.py run recorded in ``workdir``."""
  workdir_guard.check_storage(workdir)
  config_path = os.path.join(workdir, "config.json")
  if not io_utils.path(config_path).exists():
    raise checkpoint.CheckpointError(f"No config.json in {workdir}; point api.load at the "
                                     f"--workdir of a main.py run.")
  config = ml_collections.ConfigDict(workdir_guard.read_recorded(workdir))
  config_checks.validate(config)
  return config


def class_names_of(workdir: str) -> tuple[str, ...]:
  """Class names in label order, as the pipeline recorded them."""
  path = os.path.join(workdir, pipeline.CLASSES_FILE)
  if not io_utils.path(path).exists():
    raise checkpoint.CheckpointError(f"No {pipeline.CLASSES_FILE} in {workdir}; point api.load at "
                                     f"the --workdir of a main.py run.")
  return tuple(io_utils.read_json(path))
