"""The embedded default: the whole pipeline on synthetic shapes, no download, minutes on a CPU.

Small models and short schedules; the method, losses and attacks are the reference ones.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.source = "synthetic"
  config.data.num_train = 4000
  config.data.num_test = 1000
  config.log_every_steps = 20

  config.model.name = "vgg_tiny"
  config.model.width = 0.5
  config.model.mean = (0.5, 0.5, 0.5)
  config.model.std = (0.25, 0.25, 0.25)

  config.classifier.optimizer = "adam"
  config.classifier.learning_rate = 2e-3
  config.classifier.weight_decay = 0.0
  config.classifier.num_epochs = 8
  config.classifier.lr_decay_epochs = (5, 7)
  config.classifier.lr_decay_factor = 0.2
  config.classifier.augment = False

  config.caf.loss_kind = "features"

  config.craft.num_examples = 2000
  config.craft.steps = 10
  config.craft.step_size = 2 / 255
  config.craft.batch_size = 250

  config.denoiser.width = 0.25
  config.denoiser.discriminator_width = 0.25
  config.denoiser.num_epochs = 8
  config.denoiser.batch_size = 100
  config.denoiser.lr_decay_epochs = (5, 6, 7)

  config.eval.batch_size = 250
  config.eval.caf.steps = 10
  config.eval.caf.step_size = 2 / 255
  return config
