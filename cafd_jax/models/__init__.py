"""Model zoo: classifiers by name, the U-Net denoiser and the discriminator."""

import jax.numpy as jnp
from flax import linen as nn

from cafd_jax.models.airbench import (LAYOUTS as AIRBENCH_LAYOUTS, WHITEN_LAYER, AirbenchNet,
                                      whitening_kernel)
from cafd_jax.models.common import HEADS, has_gap_dense_head, head_kernel
from cafd_jax.models.discriminator import Discriminator
from cafd_jax.models.resnet import DEPTHS as RESNET_DEPTHS, ResNet
from cafd_jax.models.unet import UNetDenoiser
from cafd_jax.models.vgg import LAYOUTS as VGG_LAYOUTS, VGG
from cafd_jax.models.wide_resnet import WideResNet

CLASSIFIERS = tuple(VGG_LAYOUTS) + tuple(RESNET_DEPTHS) + ("wrn",) + tuple(AIRBENCH_LAYOUTS)


def create_classifier(name: str, *, num_classes: int, width: float = 1.0, mean=None, std=None,
                      depth: int = 28, widen_factor: int = 10, head: str = "gap_dense",
                      logit_scale: float = 1.0, whiten_padding: str = "valid",
                      dtype: jnp.dtype = jnp.float32) -> nn.Module:
  """Builds a classifier from the zoo by name (see ``CLASSIFIERS``). ``dtype`` is the compute
  dtype (parameters stay float32; the logits are float32). ``head``: ``gap_dense`` (CAM's GAP +
  dense) or ``flatten_mlp`` (flatten + two dense layers; needs Grad-CAM weights);
  ``logit_scale`` multiplies the logits; ``whiten_padding``: airbench layouts only (see
  cafd_jax/models/airbench.py)."""
  if head not in HEADS:
    raise ValueError(f"model.head must be one of {HEADS}, got {head!r}.")
  kwargs = dict(num_classes=num_classes, width=width, head=head, logit_scale=logit_scale,
                dtype=dtype)
  if mean is not None:
    kwargs.update(mean=tuple(mean), std=tuple(std))
  if name in VGG_LAYOUTS:
    return VGG(layout=VGG_LAYOUTS[name], **kwargs)
  if name in RESNET_DEPTHS:
    block, stages = RESNET_DEPTHS[name]
    return ResNet(block=block, stage_sizes=stages, **kwargs)
  if name == "wrn":
    return WideResNet(depth=depth, widen_factor=widen_factor, **kwargs)
  if name in AIRBENCH_LAYOUTS:
    return AirbenchNet(layout=AIRBENCH_LAYOUTS[name], whiten_padding=whiten_padding, **kwargs)
  raise ValueError(f"model.name must be one of {CLASSIFIERS}, got {name!r}.")


__all__ = ["AIRBENCH_LAYOUTS", "CLASSIFIERS", "HEADS", "WHITEN_LAYER", "AirbenchNet",
           "Discriminator", "UNetDenoiser", "create_classifier", "has_gap_dense_head",
           "head_kernel", "whitening_kernel"]
