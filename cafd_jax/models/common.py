"""Pieces shared by the classifiers: input normalisation and the heads."""

from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
HEAD_NAME = "head"
HEADS = ("gap_dense", "flatten_mlp")


def scaled(channels: int, width: float) -> int:
  """Channel count scaled by a width multiplier, at least 4."""
  return max(4, int(round(channels * width)))


def normalize(x: jnp.ndarray, mean: Sequence[float], std: Sequence[float]) -> jnp.ndarray:
  """Maps pixels in [0, 1] to standardised inputs; lives inside every classifier."""
  return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


class GapDenseHead(nn.Module):
  """Global average pooling followed by one dense layer: the head CAM needs."""

  num_classes: int
  logit_scale: float = 1.0

  @nn.compact
  def __call__(self, features: jnp.ndarray) -> jnp.ndarray:
    pooled = jnp.mean(features, axis=(1, 2))
    return nn.Dense(self.num_classes, name="dense", dtype=jnp.float32)(pooled) * self.logit_scale


class FlattenMlpHead(nn.Module):
  """Flatten, dense + ReLU, dense: a head CAM cannot explain (Grad-CAM can)."""

  num_classes: int
  logit_scale: float = 1.0
  hidden: int = 256

  @nn.compact
  def __call__(self, features: jnp.ndarray) -> jnp.ndarray:
    flat = features.reshape(features.shape[0], -1)
    hidden = nn.relu(nn.Dense(self.hidden, name="hidden", dtype=jnp.float32)(flat))
    return nn.Dense(self.num_classes, name="output", dtype=jnp.float32)(hidden) * self.logit_scale


def make_head(name: str, num_classes: int, logit_scale: float = 1.0) -> nn.Module:
  """The classifier head by name (see ``HEADS``), always called ``HEAD_NAME``. ``logit_scale``:
  a fixed factor on the logits (airbench's 1/9 slows the head's learning; CAM is unchanged up
  to that factor)."""
  if name == "gap_dense":
    return GapDenseHead(num_classes, logit_scale, name=HEAD_NAME)
  if name == "flatten_mlp":
    return FlattenMlpHead(num_classes, logit_scale, name=HEAD_NAME)
  raise ValueError(f"model.head must be one of {HEADS}, got {name!r}.")


def has_gap_dense_head(params) -> bool:
  """Whether the classifier's head is GAP + one dense layer (CAM's requirement)."""
  return set(params.get(HEAD_NAME, {})) == {"dense"}


def head_kernel(params) -> jnp.ndarray:
  """The final dense kernel [channels, classes] of a GAP + dense head."""
  if not has_gap_dense_head(params):
    raise ValueError("CAM weights need a GAP + dense head (model.head=gap_dense); use "
                     "caf.weights=gradcam or gradcampp for this classifier.")
  return params[HEAD_NAME]["dense"]["kernel"]
