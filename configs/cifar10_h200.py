"""CIFAR-10 on one H200 in 420 s of stage time: VGG-19 target, CAFD, HGD and pixel denoisers.

The one prepared call of a lent GPU (``launch/device_run.sh``, ``launch/README.md``) runs this
config on the packed CIFAR-10 JPEGs (``--config.data.source=packed:device_inputs/cifar10.npz``).
The method is the paper's (VGG-19 target, CAF crafting on all 50,000 training images, CAFD with
the reference code's feature loss, unseen attacks on all 10,000 test images); schedules are
shortened to fit, and every stage has a time budget (``max_seconds``), so the run ends in time
whatever the GPU's speed turns out to be: a cut stage keeps what it did (a checkpoint, the
chunks crafted, the rows evaluated) and ``report.json`` says where it was cut.

How the 420 s are split. No stage of this project has run on a GPU yet, so the split rests on
FLOP counts measured with XLA on CPU (``benchmarks.compare``: classifier step 2.0 GFLOP per
image, CAFD denoiser step 6.6, a CAF attack iteration about 1.6) and an assumed 25% of the
H200's peak (bf16 990 TFLOP/s for training; attacks run in float32, which XLA executes as TF32,
peak 495), plus compilation, which on GPU includes cuDNN autotuning: about 20-60 s per distinct
step, by analogy with 10-40 s per step on this project's CPU.

* train_classifier, 110 s: VGG-19 in bf16, batch 512, SGD with Nesterov momentum and a
  one-cycle learning rate (warm-up 20%, peak 0.2, linear decay to 0), 30 epochs: about
  1.5 M images at an estimated 20-30k img/s, 50-75 s, after ~30 s of compilation. One-cycle
  schedules reach ~93% for VGG-BN on CIFAR-10 in 30 epochs; the budget cuts training if the
  estimate is wrong, and the report then says at which step (the learning rate is then not
  annealed, so accuracy suffers: raise the budget or lower the epochs).
* craft, 50 s: CAF-PGD on the whole training set, 20 iterations of 0.01 within 8/255 (the
  paper: 100), batch 2,500: 1.0 M attack iterations, ~15-30 s after compilation.
* train_denoiser, 100 s: the full-width U-Net + discriminator in bf16, batch 500, Adam with a
  one-cycle schedule (peak 2e-3), 5 epochs on the 50,000 crafted pairs: ~33 PFLOP, ~35-60 s
  after ~40 s of compilation (the step differentiates through VGG-19 as well).
* train_baselines, 60 s: pixel and HGD denoisers on the same data and schedule; the budget is
  shared between them, and they are cheaper per step than CAFD (no discriminator; pixel
  needs no classifier).
* evaluate, 100 s: runs in this order and stops starting new ones when the budget is spent:
  clean, unseen PGD-20, unseen AutoAttack "fast" (APGD-CE + APGD-T, 20 steps, 3 targets),
  unseen CW-L2 (50 steps, one constant), unseen DDN (50 steps), then white-box PGD-20 through
  CAFD. Each costs 3-15 s of attack on 10,000 images plus its compilation, so the last ones
  may be cut.

Start-up (imports, decoding the 60,000 JPEGs, device set-up) comes on top, outside the stage
budgets; ``launch/device_run.sh`` keeps the whole call within 540 s.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.source = "packed:device_inputs/cifar10.npz"
  config.compute_dtype = "bfloat16"
  config.log_every_steps = 100
  config.max_seconds.update(dict(train_classifier=110.0, craft=50.0, train_denoiser=100.0,
                                 train_baselines=60.0, evaluate=100.0))

  config.model.name = "vgg19"

  config.classifier.optimizer = "sgd"
  config.classifier.nesterov = True
  config.classifier.schedule = "one_cycle"
  config.classifier.learning_rate = 0.2
  config.classifier.warmup_fraction = 0.2
  config.classifier.weight_decay = 5e-4
  config.classifier.num_epochs = 30
  config.classifier.batch_size = 512

  config.craft.steps = 20
  config.craft.step_size = 0.01
  config.craft.batch_size = 2500

  config.denoiser.schedule = "one_cycle"
  config.denoiser.learning_rate = 2e-3
  config.denoiser.num_epochs = 5
  config.denoiser.batch_size = 500

  config.eval.batch_size = 1000
  config.eval.attacks = "none,pgd,autoattack,cw,ddn"
  config.eval.defenses = "none,cafd,hgd,pixel"
  config.eval.threat_models = "unseen,white_box"
  config.eval.adaptive_defenses = "cafd"
  config.eval.adaptive_attacks = "pgd"
  config.eval.autoattack.update(dict(version="fast", steps=20, n_target_classes=3))
  config.eval.cw.update(dict(steps=50, binary_search_steps=1))
  config.eval.ddn.steps = 50
  return config
