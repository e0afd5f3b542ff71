"""Model zoo: classifiers by name, the U-Net denoiser and the discriminator."""

import jax.numpy as jnp
from flax import linen as nn

from cafd_jax.models.common import head_kernel
from cafd_jax.models.discriminator import Discriminator
from cafd_jax.models.resnet import DEPTHS as RESNET_DEPTHS, ResNet
from cafd_jax.models.unet import UNetDenoiser
from cafd_jax.models.vgg import LAYOUTS as VGG_LAYOUTS, VGG
from cafd_jax.models.wide_resnet import WideResNet

CLASSIFIERS = tuple(VGG_LAYOUTS) + tuple(RESNET_DEPTHS) + ("wrn",)


def create_classifier(name: str, *, num_classes: int, width: float = 1.0, mean=None, std=None,
                      depth: int = 28, widen_factor: int = 10,
                      dtype: jnp.dtype = jnp.float32) -> nn.Module:
  """Builds a classifier from the zoo by name (see ``CLASSIFIERS``). ``dtype`` is the compute
  dtype (parameters stay float32; the logits are float32)."""
  kwargs = dict(num_classes=num_classes, width=width, dtype=dtype)
  if mean is not None:
    kwargs.update(mean=tuple(mean), std=tuple(std))
  if name in VGG_LAYOUTS:
    return VGG(layout=VGG_LAYOUTS[name], **kwargs)
  if name in RESNET_DEPTHS:
    block, stages = RESNET_DEPTHS[name]
    return ResNet(block=block, stage_sizes=stages, **kwargs)
  if name == "wrn":
    return WideResNet(depth=depth, widen_factor=widen_factor, **kwargs)
  raise ValueError(f"model.name must be one of {CLASSIFIERS}, got {name!r}.")


__all__ = ["CLASSIFIERS", "Discriminator", "UNetDenoiser", "create_classifier", "head_kernel"]
