"""VGG-style discriminator with a single logit, for the relativistic GAN term."""

import jax.numpy as jnp
from flax import linen as nn

from cafd_jax.models import common, layers


class Discriminator(nn.Module):
  """Conv pairs (stride 1, stride 2) with LeakyReLU, then GAP and a dense logit [B]."""

  base_channels: int = 64
  num_stages: int = 4
  width: float = 1.0

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    h = 2.0 * x - 1.0
    for stage in range(self.num_stages):
      channels = common.scaled(self.base_channels * 2**stage, self.width)
      h = nn.leaky_relu(layers.Conv3x3(channels)(h), 0.2)
      h = nn.leaky_relu(layers.Conv3x3(channels, strides=2)(h), 0.2)
    h = jnp.mean(h, axis=(1, 2))
    h = nn.leaky_relu(nn.Dense(common.scaled(100, self.width))(h), 0.2)
    return nn.Dense(1)(h)[:, 0]
