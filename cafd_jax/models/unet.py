"""HGD-style U-Net denoiser (Liao et al. 2018) as used by CAFD: predicts the noise.

Encoder stages 64,128,256,256,256 (2,3,3,3,3 conv-BN-ReLU, every stage after the first
starts with a stride-2 conv); decoder stages 256,256,128,64 (3,3,3,2 conv-BN-ReLU), each
after bilinear upsampling and concatenation with the encoder skip; a 1x1 conv predicts the
noise and the output is ``clip(x + noise, 0, 1)``. The noise head starts at zero, so an untrained
denoiser is the identity.
"""

from typing import Sequence

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from cafd_jax.models import common, layers


class ConvBlocks(nn.Module):
  """``num_convs`` conv3x3-BN-ReLU; the first one strided."""

  channels: int
  num_convs: int
  strides: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    for index in range(self.num_convs):
      strides = self.strides if index == 0 else 1
      x = layers.Conv3x3(self.channels, strides, dtype=self.dtype)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
      x = nn.relu(x)
    return x


class UNetDenoiser(nn.Module):
  """Maps adversarial images in [0, 1] to denoised images in [0, 1]."""

  encoder_channels: Sequence[int] = (64, 128, 256, 256, 256)
  encoder_convs: Sequence[int] = (2, 3, 3, 3, 3)
  decoder_channels: Sequence[int] = (256, 256, 128, 64)
  decoder_convs: Sequence[int] = (3, 3, 3, 2)
  width: float = 1.0
  dtype: jnp.dtype = jnp.float32

  def predict_noise(self, x, train: bool):
    h = x.astype(self.dtype)
    skips = []
    for stage, (channels, convs) in enumerate(zip(self.encoder_channels, self.encoder_convs)):
      h = ConvBlocks(common.scaled(channels, self.width), convs, 1 if stage == 0 else 2,
                     dtype=self.dtype)(h, train)
      skips.append(h)
    for channels, convs, skip in zip(self.decoder_channels, self.decoder_convs, skips[-2::-1]):
      h = jax.image.resize(h, (h.shape[0], *skip.shape[1:3], h.shape[3]), method="bilinear")
      h = ConvBlocks(common.scaled(channels, self.width), convs, dtype=self.dtype)(
          jnp.concatenate([h, skip], axis=-1), train)
    # Zero-initialised noise head: training starts from the identity map x -> x.
    return nn.Conv(x.shape[-1], (1, 1), dtype=jnp.float32, kernel_init=nn.initializers.zeros,
                   name="noise")(h)

  @nn.compact
  def __call__(self, x, train: bool = False):
    chex.assert_rank(x, 4)
    if len(self.decoder_channels) != len(self.encoder_channels) - 1:
      raise ValueError("UNetDenoiser needs one decoder stage fewer than encoder stages.")
    noise = self.predict_noise(x, train)
    return jnp.clip(x + noise.astype(x.dtype), 0.0, 1.0)
