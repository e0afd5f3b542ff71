"""A fast CIFAR target after airbench (Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU").

A fixed 2x2 patch-whitening convolution, then three blocks of conv -> 2x2 max pool -> BN -> GELU
-> conv -> BN -> GELU, then the zoo's GAP + dense head (so CAM applies to the last block's map).
As in airbench, the whitening convolution is unpadded and each pooling drops an odd last row and
column (maps 31 -> 15 -> 7 -> 3, a 3x3 CAM); ``whiten_padding="same"`` pads its right and bottom
edge instead (32 -> 16 -> 8 -> 4: 29% more FLOPs, and training steps 29% longer on 2 CPU
cores, docs/benchmarks.md; the geometry of runs before this option existed). The head averages
rather than max-pools, without airbench's fixed logit scale.

The whitening kernel is data-dependent: ``whitening_kernel`` computes it from training images
and ``classifier.whiten_patches`` (train/classifier.py) installs and freezes it. Convolutions
start as identities on their first input channels (airbench's "dirac" initialisation); the
BatchNorms have no scale, a fast momentum and float32 statistics.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cafd_jax.models import common, layers

LAYOUTS: dict[str, tuple[int, int, int]] = {
    "airbench93": (64, 128, 128),  # airbench's 93% network (a quarter of the 94% one's FLOPs)
    "airbench94": (64, 256, 256),
}
WHITEN_LAYER = "whiten"
WHITEN_PADDINGS = ("valid", "same")


def dirac_uniform(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jnp.ndarray:
  """[kh, kw, in, out] kernel uniform in +-1/sqrt(fan_in) (PyTorch's default, as airbench has
  it: the scale sets the effective learning rate of a convolution followed by BatchNorm) whose
  first min(in, out) filters are identities."""
  kernel = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")(key, shape, dtype)
  kh, kw, channels_in, channels_out = shape
  identities = min(channels_in, channels_out)
  dirac = jnp.zeros((kh, kw, channels_in, identities), dtype)
  dirac = dirac.at[kh // 2, kw // 2, jnp.arange(identities), jnp.arange(identities)].set(1)
  return kernel.at[..., :identities].set(dirac)


def whitening_kernel(normalized_images: np.ndarray, patch_size: int = 2,
                     eps: float = 5e-4) -> np.ndarray:
  """[p, p, C, 2 p^2 C] kernel mapping each p x p patch to its coordinates in the eigenbasis of
  the patch covariance, scaled to unit variance, and their negatives (largest first)."""
  images = np.asarray(normalized_images, np.float64)
  _, height, width, channels = images.shape
  patches = np.stack([images[:, i:height - patch_size + 1 + i, j:width - patch_size + 1 + j]
                      for i in range(patch_size) for j in range(patch_size)], axis=3)
  patches = patches.reshape(-1, patch_size * patch_size * channels)  # (i, j, c) order
  covariance = patches.T @ patches / len(patches)
  eigenvalues, eigenvectors = np.linalg.eigh(covariance)
  order = np.argsort(eigenvalues)[::-1]
  scaled = eigenvectors[:, order] / np.sqrt(eigenvalues[order] + eps)
  kernel = scaled.reshape(patch_size, patch_size, channels, -1)
  return np.concatenate([kernel, -kernel], axis=-1).astype(np.float32)


def _even_crop(h: jnp.ndarray) -> jnp.ndarray:
  """Drops an odd last row and column of an NHWC map: PyTorch's floor pooling (airbench's)."""
  return h[:, :h.shape[1] // 2 * 2, :h.shape[2] // 2 * 2]


class AirbenchNet(nn.Module):
  """Whitening conv + three conv blocks + GAP/dense head. Returns logits, or (logits, last
  conv features)."""

  layout: Sequence[int]
  num_classes: int = 10
  width: float = 1.0
  mean: Sequence[float] = common.CIFAR10_MEAN
  std: Sequence[float] = common.CIFAR10_STD
  dtype: jnp.dtype = jnp.float32
  head: str = "gap_dense"  # see common.HEADS
  logit_scale: float = 1.0  # fixed factor on the logits
  patch_size: int = 2
  whiten_padding: str = "valid"  # see WHITEN_PADDINGS and the module docstring

  def _norm(self, h, train: bool, name: str):
    # airbench's running statistics keep 0.6 of the old value per step (PyTorch momentum 0.4).
    normed = nn.BatchNorm(use_running_average=not train, momentum=0.6, epsilon=1e-12,
                          use_scale=False, dtype=jnp.float32, name=name)(h.astype(jnp.float32))
    return nn.gelu(normed).astype(self.dtype)

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    h = common.normalize(x, self.mean, self.std).astype(self.dtype)
    channels = x.shape[-1]
    whiten = self.param(WHITEN_LAYER, nn.initializers.lecun_normal(),
                        (self.patch_size, self.patch_size, channels,
                         2 * self.patch_size ** 2 * channels))
    whiten_bias = self.param(f"{WHITEN_LAYER}_bias", nn.initializers.zeros, (whiten.shape[-1],))
    if self.whiten_padding not in WHITEN_PADDINGS:
      raise ValueError(f"model.whiten_padding must be one of {WHITEN_PADDINGS}, "
                       f"got {self.whiten_padding!r}.")
    edge = self.patch_size - 1 if self.whiten_padding == "same" else 0
    pad = ((0, edge), (0, edge))
    h = layers.conv_general_dilated(h, whiten.astype(self.dtype), (1, 1), pad,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = nn.gelu(h + whiten_bias.astype(self.dtype))
    for index, channels_out in enumerate(self.layout):
      channels_out = common.scaled(channels_out, self.width)
      h = self._conv(channels_out, f"block{index}_conv0")(h)
      h = self._norm(layers.max_pool_2x2(_even_crop(h)), train, f"block{index}_norm0")
      h = self._conv(channels_out, f"block{index}_conv1")(h)
      h = self._norm(h, train, f"block{index}_norm1")
    features = h.astype(jnp.float32)
    logits = common.make_head(self.head, self.num_classes, self.logit_scale)(features)
    return (logits, features) if return_features else logits

  def _conv(self, channels_out: int, name: str) -> nn.Module:
    return layers.Conv3x3(channels_out, use_bias=False, dtype=self.dtype,
                          kernel_init=dirac_uniform, name=name)
