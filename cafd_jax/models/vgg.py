"""VGG with BatchNorm for 32x32 inputs; features are taken before the last pooling."""

from typing import Sequence, Union

import jax.numpy as jnp
from flax import linen as nn

from cafd_jax.models import common, layers

# "M" is 2x2 max pooling. The trailing pool of the classic layouts is replaced by the
# GAP + dense head, so the last feature map is 2x2 for the standard depths.
LAYOUTS: dict[str, tuple[Union[int, str], ...]] = {
    "vgg_tiny": (32, "M", 64, "M", 128, 128),
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512,
              "M", 512, 512, 512, 512),
}
# The classic layouts with their trailing pool (a 1x1 map before the head), as the CAFD
# reference's VGG has them: what ``python -m cafd_jax.convert --layout cafd_vgg`` builds. Their
# CAM is of a single position; use Grad-CAM on the last convolution's output instead.
LAYOUTS.update({f"{name}_ref": layout + ("M",) for name, layout in list(LAYOUTS.items())
                if name != "vgg_tiny"})


class VGG(nn.Module):
  """VGG-BN classifier. Returns logits, or (logits, last conv features)."""

  layout: Sequence[Union[int, str]]
  num_classes: int = 10
  width: float = 1.0
  mean: Sequence[float] = common.CIFAR10_MEAN
  std: Sequence[float] = common.CIFAR10_STD
  dtype: jnp.dtype = jnp.float32
  head: str = "gap_dense"  # see common.HEADS
  logit_scale: float = 1.0  # fixed factor on the logits

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    h = common.normalize(x, self.mean, self.std).astype(self.dtype)
    for item in self.layout:
      if item == "M":
        h = layers.max_pool_2x2(h)
        continue
      h = layers.Conv3x3(common.scaled(item, self.width), dtype=self.dtype)(h)
      h = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(h)
      h = nn.relu(h)
    features = h.astype(jnp.float32)
    logits = common.make_head(self.head, self.num_classes, self.logit_scale)(features)
    return (logits, features) if return_features else logits
