"""Wide-ResNet (Zagoruyko & Komodakis) for 32x32 inputs; features are 8x8."""

from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

from cafd_jax.models import common, layers


class WideBlock(nn.Module):
  """Pre-activation residual block."""

  channels: int
  strides: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)
    pre = nn.relu(norm()(x))
    h = layers.conv(self.channels, (3, 3), self.strides, padding=1, use_bias=False, dtype=self.dtype)(pre)
    h = nn.relu(norm()(h))
    h = layers.conv(self.channels, (3, 3), padding=1, use_bias=False, dtype=self.dtype)(h)
    if self.strides != 1 or x.shape[-1] != self.channels:
      x = layers.conv(self.channels, (1, 1), self.strides, use_bias=False, dtype=self.dtype)(pre)
    return x + h


class WideResNet(nn.Module):
  """WRN-depth-widen. Returns logits, or (logits, last conv features)."""

  depth: int = 28
  widen_factor: int = 10
  num_classes: int = 10
  width: float = 1.0
  mean: Sequence[float] = common.CIFAR10_MEAN
  std: Sequence[float] = common.CIFAR10_STD
  dtype: jnp.dtype = jnp.float32
  head: str = "gap_dense"  # see common.HEADS
  logit_scale: float = 1.0  # fixed factor on the logits

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    if (self.depth - 4) % 6:
      raise ValueError(f"WideResNet depth must be 6n+4 (e.g. 28), got {self.depth}.")
    blocks_per_stage = (self.depth - 4) // 6
    h = common.normalize(x, self.mean, self.std).astype(self.dtype)
    h = layers.conv(common.scaled(16, self.width), (3, 3), padding=1, use_bias=False, dtype=self.dtype)(h)
    for stage, base in enumerate((16, 32, 64)):
      channels = common.scaled(base * self.widen_factor, self.width)
      for index in range(blocks_per_stage):
        strides = 2 if stage > 0 and index == 0 else 1
        h = WideBlock(channels, strides, dtype=self.dtype)(h, train)
    h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(h))
    features = h.astype(jnp.float32)
    logits = common.make_head(self.head, self.num_classes, self.logit_scale)(features)
    return (logits, features) if return_features else logits
