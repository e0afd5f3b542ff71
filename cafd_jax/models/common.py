"""Pieces shared by the classifiers: input normalisation and the GAP + dense head."""

from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
HEAD_NAME = "head"


def scaled(channels: int, width: float) -> int:
  """Channel count scaled by a width multiplier, at least 4."""
  return max(4, int(round(channels * width)))


def normalize(x: jnp.ndarray, mean: Sequence[float], std: Sequence[float]) -> jnp.ndarray:
  """Maps pixels in [0, 1] to standardised inputs; lives inside every classifier."""
  return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


class GapDenseHead(nn.Module):
  """Global average pooling followed by one dense layer: the head CAM needs."""

  num_classes: int

  @nn.compact
  def __call__(self, features: jnp.ndarray) -> jnp.ndarray:
    pooled = jnp.mean(features, axis=(1, 2))
    return nn.Dense(self.num_classes, name="dense", dtype=jnp.float32)(pooled)


def head_kernel(params) -> jnp.ndarray:
  """The final dense kernel [channels, classes] of any classifier in the zoo."""
  return params[HEAD_NAME]["dense"]["kernel"]
