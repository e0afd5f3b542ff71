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

The split, from the whole run of 2026-12-01 (commit 6c5c0ec, 2 cores, docs/results.md; its
target then: SGD alone, 10 epochs, 89.42%), each stage's ``[pipeline] STAGE took`` against its
budget then:
  train_classifier  480 steps, 2,514 s                        budget 2,750 s (not cut)
  craft             38 of 40 chunks of 500 at ~18 img/s, 1,064 s  budget 1,050 s (cut)
  train_denoiser    CAFD, 1,782 of 1,900 steps, 1,012 s           budget 1,010 s (cut)
  train_baselines   pixel 352 s (whole), hgd 965 s (1,820 of 1,900 steps), cafd_caf 934 s
                    (1,652 of 1,900), 2,252 s                     budget 2,250 s (cut)
  evaluate          2,000 images, 5 unseen attacks, the sweep, white-box PGD, 1,203 s
                                                                  budget 1,500 s (not cut)
The budgets below give each stage what that run measured it needs for the whole config
(20,000 crafted examples, 2,000 steps per denoiser) on that machine: 8,900 s in all, within
2 h 30 min with start-up. On a slower machine ``fit_epochs_to_budget`` times the first steps of
the classifier and of each denoiser and trains the whole epochs that fit, its one-cycle schedule
shortened to match (not cut part-way); crafting stops where its budget ends, and evaluation too,
with every row of its grid on the examples of the rounds of 500 done (their ``n``).
DIR/stages.json and report.json say what was fitted or cut. With airbench's geometry (commit
65b757b) ``python -m benchmarks.stages --config configs/cifar10_cpu.py`` estimated on
2026-12-03's machine: target 41.4 min, crafting 20.4, CAFD 24.9, baselines 46.4, evaluation
19.9 (without white-box PGD and the sweep): 2.5 h, so there crafting and the denoisers would be
cut or fitted; a machine about 10% faster runs the whole config (docs/benchmarks.md).
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.source = "folder:../shared/data/cifar10"
  config.log_every_steps = 100
  config.max_seconds.update(dict(train_classifier=2650.0, craft=1150.0, train_denoiser=1150.0,
                                 train_baselines=2600.0, evaluate=1350.0))
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
