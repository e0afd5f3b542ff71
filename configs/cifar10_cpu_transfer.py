"""The transfer setting of configs/cifar10_cpu.py: a second classifier on the same data,
attacked unseen behind the denoisers trained against the first.

The paper's transfer setting puts a denoiser trained against one classifier in front of
another. ``train`` (the default) trains only that other classifier, ``vgg_tiny`` (4 conv
layers, 0.24M parameters), with a one-cycle schedule for a CPU; ``evaluate`` then attacks it
(``eval.transfer_attacks``: clean, PGD-20, AutoAttack "fast") behind every defense of the
finished ``runs/cifar10_cpu`` (its denoisers, trained against airbench94), on the same 2,000
test images, in a workdir of its own; that run's own grid is cut to clean accuracy here (its
full grid is its own report):

    python main.py --config configs/cifar10_cpu_transfer.py --workdir runs/cifar10_cpu_vgg_tiny
    python main.py --config configs/cifar10_cpu_transfer.py:evaluate \\
        --workdir runs/cifar10_cpu_transfer

The second report's rows for model ``vgg_tiny@cifar10_cpu_vgg_tiny`` are the transfer table
(docs/results.md). Rows of the same kind come beside the full grid from
``configs/cifar10_cpu.py --config.eval.transfer_workdirs="('runs/cifar10_cpu_vgg_tiny',)"``.
"""

from configs import cifar10_cpu


UPSTREAM = "runs/cifar10_cpu"  # the finished configs/cifar10_cpu.py run
TARGET = "runs/cifar10_cpu_vgg_tiny"  # this config's ``train`` run


def get_config(stage: str = "train"):
  if stage not in ("train", "evaluate"):
    raise ValueError(f"cifar10_cpu_transfer takes train or evaluate, got {stage!r}.")
  if stage == "evaluate":
    return _evaluate_config()
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
  train.flip = "random"
  return config


def _evaluate_config():
  config = cifar10_cpu.get_config()
  config.stages = "evaluate"
  config.upstream_workdir = config.eval.denoiser_workdir = UPSTREAM
  config.eval.transfer_workdirs = (TARGET,)
  config.eval.attacks = "none"  # the upstream classifier's own grid: clean accuracy only
  config.eval.threat_models = "unseen"
  config.eval.sweep_eps = ()
  config.max_seconds.evaluate = 0.0  # the transfer rows are the point: none cut
  return config
