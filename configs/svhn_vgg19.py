"""SVHN (tfds svhn_cropped), VGG-19 target. No flips for digits."""

from configs import base


def get_config():
  config = base.get_config()
  config.data.source = "tfds:svhn_cropped"
  config.model.mean = (0.4377, 0.4438, 0.4728)
  config.model.std = (0.1980, 0.2010, 0.1970)
  config.classifier.augment = False
  return config
