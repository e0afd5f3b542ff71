"""The transfer target of configs/cifar10_cpu.py: a second classifier on the same data.

The paper's transfer setting puts a denoiser trained against one classifier in front of
another. This config trains only that other classifier, ``vgg_tiny`` (4 conv layers, 0.24M
parameters), with a one-cycle schedule for a CPU:

    python main.py --config configs/cifar10_cpu_transfer.py --workdir runs/cifar10_cpu_vgg_tiny
    python main.py --config configs/cifar10_cpu.py --workdir runs/cifar10_cpu \\
        --config.eval.transfer_workdirs="('runs/cifar10_cpu_vgg_tiny',)"

The second command's report then also has rows for model ``vgg_tiny@cifar10_cpu_vgg_tiny``:
that classifier attacked unseen (``eval.transfer_attacks``) behind the denoisers trained
against airbench94.
"""

from configs import cifar10_cpu


def get_config():
  config = cifar10_cpu.get_config()
  config.stages = "train_classifier"
  config.model.name = "vgg_tiny"
  train = config.classifier
  train.optimizer = "sgd"
  train.nesterov = True
  train.momentum = 0.9
  train.batch_size = 256
  train.learning_rate = 0.1
  train.weight_decay = 5e-4
  train.schedule = "one_cycle"
  train.warmup_fraction = 0.2
  train.num_epochs = 12
  train.label_smoothing = 0.1
  train.crop_padding = 4
  train.crop_pad_mode = "constant"
  train.whiten_patches = False
  train.norm_bias_lr_scale = 1.0
  train.lookahead = False
  return config
