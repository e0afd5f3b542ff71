"""CIFAR-10, VGG-19 target: the paper's main setting with the reference hyper-parameters."""

from configs import base


def get_config():
  return base.get_config()
