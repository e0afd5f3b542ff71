"""A classifier of your own, defended by cafd-jax without changing a line of the package.

    python main.py --config configs/quickstart.py --workdir /tmp/own \\
        --config.model.name=import:examples.small_cnn:make \\
        [--config.classifier.init_from=VARIABLES.msgpack --config.classifier.num_epochs=0]

``make(num_classes)`` returns any ``nn.Module`` over NHWC pixels in [0, 1] with a
``train`` flag. Ending it in ``GapDenseHead(num_classes, name="head")`` (global average pooling
+ one dense layer) gives it a CAM; a model without one uses ``--config.caf.weights=gradcam``
and ``--config.caf.feature_layer=`` one of its layers.
"""

from flax import linen as nn

from cafd_jax.models.common import GapDenseHead


class SmallCnn(nn.Module):
  """Three conv + BatchNorm + ReLU stages, 2x2 max pooling between them, GAP + dense."""

  num_classes: int
  widths: tuple[int, ...] = (16, 32, 64)

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = (images - 0.5) / 0.25
    for index, width in enumerate(self.widths):
      if index:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = nn.Conv(width, (3, 3), use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    return GapDenseHead(self.num_classes, name="head")(x)


def make(num_classes: int) -> nn.Module:
  return SmallCnn(num_classes)
