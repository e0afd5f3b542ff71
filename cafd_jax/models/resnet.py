"""ResNet-18/34/50 with the CIFAR stem (3x3 conv, no max pooling); features are 4x4."""

from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

from cafd_jax.models import common, layers

DEPTHS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


class BasicBlock(nn.Module):
  channels: int
  strides: int
  dtype: jnp.dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)
    h = layers.conv(self.channels, (3, 3), self.strides, padding=1, use_bias=False, dtype=self.dtype)(x)
    h = nn.relu(norm()(h))
    h = layers.conv(self.channels, (3, 3), padding=1, use_bias=False, dtype=self.dtype)(h)
    h = norm()(h)
    return nn.relu(h + _shortcut(x, self.channels, self.strides, norm, self.dtype))


class Bottleneck(nn.Module):
  channels: int
  strides: int
  dtype: jnp.dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)
    out_channels = self.channels * self.expansion
    h = nn.relu(norm()(layers.conv(self.channels, (1, 1), use_bias=False, dtype=self.dtype)(x)))
    h = layers.conv(self.channels, (3, 3), self.strides, padding=1, use_bias=False, dtype=self.dtype)(h)
    h = nn.relu(norm()(h))
    h = norm()(layers.conv(out_channels, (1, 1), use_bias=False, dtype=self.dtype)(h))
    return nn.relu(h + _shortcut(x, out_channels, self.strides, norm, self.dtype))


def _shortcut(x, out_channels: int, strides: int, norm, dtype):
  """Identity, or a strided 1x1 projection when the shape changes."""
  if strides == 1 and x.shape[-1] == out_channels:
    return x
  return norm()(layers.conv(out_channels, (1, 1), strides, use_bias=False, dtype=dtype)(x))


class ResNet(nn.Module):
  """CIFAR ResNet. Returns logits, or (logits, last conv features)."""

  block: str
  stage_sizes: Sequence[int]
  num_classes: int = 10
  width: float = 1.0
  mean: Sequence[float] = common.CIFAR10_MEAN
  std: Sequence[float] = common.CIFAR10_STD
  dtype: jnp.dtype = jnp.float32
  head: str = "gap_dense"  # see common.HEADS
  logit_scale: float = 1.0  # fixed factor on the logits

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    block_cls = BasicBlock if self.block == "basic" else Bottleneck
    h = common.normalize(x, self.mean, self.std).astype(self.dtype)
    h = layers.conv(common.scaled(64, self.width), (3, 3), padding=1, use_bias=False, dtype=self.dtype)(h)
    h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(h))
    for stage, num_blocks in enumerate(self.stage_sizes):
      channels = common.scaled(64 * 2**stage, self.width)
      for index in range(num_blocks):
        strides = 2 if stage > 0 and index == 0 else 1
        h = block_cls(channels, strides, dtype=self.dtype)(h, train)
    features = h.astype(jnp.float32)
    logits = common.make_head(self.head, self.num_classes, self.logit_scale)(features)
    return (logits, features) if return_features else logits
