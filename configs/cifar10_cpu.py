"""Real CIFAR-10 on a CPU: the whole pipeline within 2 hours on 2 cores (docs/results.md).

Reads the ImageFolder copy at ../shared/data/cifar10 (JPEG re-encoding of CIFAR-10). The method,
losses and attacks are the reference ones; what is shortened to fit the CPU budget:
- target: a 4-conv VGG-BN (``vgg_tiny``, 0.24M parameters) trained 15 epochs, not VGG-19 for 200;
- crafting: CAF-PGD with 10 steps of 2/255 (not 100 of 0.01) on 10,000 training images;
- denoisers: U-Net at a quarter width, a few epochs on those 10,000 pairs;
- baselines: the pixel-loss and HGD denoisers get CAFD's data, U-Net and schedule;
- evaluation: 1,000 test images; CW-L2 (20 steps, one constant) and DDN (20 steps) shortened;
  AutoAttack is the reduced "fast" version (APGD-CE then APGD-T, 20 steps, 3 target classes),
  not the standard one; white-box attacks target the CAFD denoiser only (``adaptive_defenses``);
  the accuracy-vs-eps sweep (2, 4, 16 /255) is unseen only (``sweep_threat_models``).
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.source = "folder:../shared/data/cifar10"
  config.log_every_steps = 100

  config.model.name = "vgg_tiny"
  config.model.width = 1.0

  config.classifier.optimizer = "sgd"
  config.classifier.learning_rate = 0.05
  config.classifier.nesterov = True
  config.classifier.num_epochs = 15
  config.classifier.batch_size = 128
  config.classifier.lr_decay_epochs = (8, 11, 13)
  config.classifier.lr_decay_factor = 0.2

  config.craft.num_examples = 10000
  config.craft.steps = 10
  config.craft.step_size = 2 / 255
  config.craft.batch_size = 500

  config.denoiser.width = 0.25
  config.denoiser.discriminator_width = 0.25
  config.denoiser.num_epochs = 3
  config.denoiser.batch_size = 100
  config.denoiser.lr_decay_epochs = (2,)

  config.eval.num_examples = 1000
  config.eval.batch_size = 500
  config.eval.attacks = "none,caf,pgd,cw,ddn,autoattack"
  config.eval.defenses = "none,cafd,pixel,hgd,bit_depth,median,jpeg"
  config.eval.threat_models = "unseen,white_box"
  config.eval.adaptive_defenses = "cafd"
  config.eval.sweep_eps = (2 / 255, 4 / 255, 16 / 255)
  config.eval.sweep_threat_models = "unseen"
  config.eval.caf.update(dict(steps=20, step_size=2 / 255))
  config.eval.cw.update(dict(steps=20, binary_search_steps=1))
  config.eval.ddn.steps = 20
  config.eval.autoattack.update(dict(version="fast", steps=20, n_target_classes=3))
  return config
