"""Real CIFAR-10 on a CPU: the whole pipeline as one invocation of at most 2 h 30 min on 2 cores.

Reads the ImageFolder copy at ../shared/data/cifar10 (JPEG re-encoding of CIFAR-10); results
and the command in docs/results.md. The method, losses and attacks are the reference ones; what
is shortened to fit the CPU, and the time each stage was given (SPLIT below), is measured:
- target: ``airbench94`` (cafd_jax/models/airbench.py; 1.97M parameters) with airbench's
  training tricks (patch whitening, airbench94_muon's Muon for the convolution kernels and
  one-cycle nesterov SGD for the rest, label smoothing 0.2, 64x lr on BatchNorm biases,
  2-pixel crops of the mirror-padded image, alternating flips, lookahead) and its geometry
  (maps 31 -> 15 -> 7 -> 3), 9 epochs at batch 1,024 (90.30% alone in 2,577 s,
  docs/results.md), instead of VGG-19 for 200 epochs;
- crafting: CAF-PGD, 20 steps of 2/255 (eps 8/255) on 20,000 training images, not 100 steps
  of 0.01 on all 50,000;
- denoisers: CAFD (the reference code's feature loss), CAFD with the paper's CAF loss
  (``cafd_caf``), HGD and pixel, each a U-Net at 1/8 of the full width, 10 epochs on those
  20,000 pairs, one-cycle Adam;
- evaluation: 2,000 test images; unseen PGD-20, AutoAttack "fast" (APGD-CE then APGD-T,
  20 steps, 3 target classes), CW-L2 (20 steps, one constant), DDN (20 steps), the CAF attack
  (20 steps); white-box PGD-20 through the CAFD denoiser only; PGD at 4 and 16/255 (unseen).

The split follows what each stage needs for the whole config (20,000 crafted examples, 2,000
steps per denoiser), measured on a 2-core machine of 2026-12-03 with airbench's geometry (commit
65b757b): the target's stage alone took 2,577 s (its ``[pipeline] train_classifier took``);
``python -m benchmarks.stages --config configs/cifar10_cpu.py`` estimated crafting 1,224 s, CAFD
1,494 s, the baselines 2,784 s and evaluation 1,194 s before white-box PGD and the eps sweep
(about 450 s more from its PGD row: three more PGD runs and their predictions), 9,700 s in all.
The target keeps its need with room for ``fit_epochs_to_budget``'s 5% margin (2,577 s / 0.95
plus compilation; at 2,650 s the first steps' 6.04 s there fitted it to 8 epochs, and 8 gave
89.9-90.4% with the earlier geometry); the other stages share the rest of 8,900 s (2 h 30 min
with start-up) in proportion to their needs, 85% of each:
  train_classifier 2,800   craft 1,045   train_denoiser 1,275   train_baselines 2,375
  evaluate 1,405
The whole run on a machine of that step (docs/results.md: 2 h 13 min) kept the target's 9
epochs, crafted 16,000 examples (crafting ran at 15 img/s, slower than estimated) and trained
every denoiser its 10 epochs on them (their steps were faster than estimated); uncut it would
have taken about 2 h 31 min (docs/benchmarks.md has the stage table; a narrower denoiser would
not shorten it: its steps are the classifier's passes). On a slower machine
``fit_epochs_to_budget`` times the first steps of the classifier and of each denoiser and trains
the whole epochs that fit, its one-cycle schedule shortened to match (not cut part-way);
crafting stops where its budget ends, and evaluation too, with every row of its grid on the
examples of the rounds of 500 done (their ``n``).
DIR/stages.json and report.json say what was fitted or cut.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.source = "folder:../shared/data/cifar10"
  config.log_every_steps = 100
  config.max_seconds.update(dict(train_classifier=2800.0, craft=1045.0, train_denoiser=1275.0,
                                 train_baselines=2375.0, evaluate=1405.0))
  config.fit_epochs_to_budget = True

  config.model.name = "airbench94"
  config.model.width = 1.0

  # airbench's hyper-parameters (batch 1,024; lr 11.5, wd 0.0153 in its decoupled form) as
  # coupled SGD on the mean loss: the same step per example and decay per step.
  train = config.classifier
  train.optimizer = "muon"  # Muon for the convolution kernels, this SGD for the rest
  train.muon_learning_rate = 0.17
  train.nesterov = True
  train.momentum = 0.85
  train.batch_size = 1024
  train.learning_rate = 1.5
  train.weight_decay = 1.33e-3
  train.schedule = "one_cycle"
  train.warmup_fraction = 0.23
  train.num_epochs = 9
  train.label_smoothing = 0.2
  train.crop_padding = 2
  train.crop_pad_mode = "reflect"
  train.whiten_patches = True
  train.norm_bias_lr_scale = 64.0
  train.lookahead = True
  train.flip = "alternating"

  config.craft.num_examples = 20000
  config.craft.steps = 20
  config.craft.step_size = 2 / 255
  config.craft.batch_size = 500

  config.denoiser.width = 0.125
  config.denoiser.discriminator_width = 0.25
  config.denoiser.num_epochs = 10
  config.denoiser.batch_size = 100
  config.denoiser.schedule = "one_cycle"
  config.denoiser.warmup_fraction = 0.1

  config.eval.num_examples = 2000
  config.eval.batch_size = 500
  config.eval.attacks = "none,caf,pgd,cw,ddn,autoattack"
  config.eval.defenses = "none,cafd,cafd_caf,hgd,pixel,bit_depth,median,jpeg"
  config.eval.threat_models = "unseen,white_box"
  config.eval.adaptive_defenses = "cafd"
  config.eval.adaptive_attacks = "pgd"
  config.eval.sweep_eps = (4 / 255, 16 / 255)
  config.eval.sweep_threat_models = "unseen"
  config.eval.caf.update(dict(steps=20, step_size=2 / 255))
  config.eval.cw.update(dict(steps=20, binary_search_steps=1))
  config.eval.ddn.steps = 20
  config.eval.autoattack.update(dict(version="fast", steps=20, n_target_classes=3))
  # With --config.eval.transfer_workdirs (configs/cifar10_cpu_transfer.py), that target's attacks.
  config.eval.transfer_attacks = "none,pgd,autoattack"
  return config
