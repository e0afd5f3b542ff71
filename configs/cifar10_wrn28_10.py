"""CIFAR-10, WRN-28-10 target, reference hyper-parameters."""

from configs import base


def get_config():
  config = base.get_config()
  config.model.name = "wrn"
  config.model.depth = 28
  config.model.widen_factor = 10
  return config
