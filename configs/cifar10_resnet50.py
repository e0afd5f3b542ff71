"""CIFAR-10, ResNet-50 target, reference hyper-parameters."""

from configs import base


def get_config():
  config = base.get_config()
  config.model.name = "resnet50"
  return config
