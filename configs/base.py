"""Reference CAFD hyper-parameters (Zhou et al. 2021 and its public code), shared by configs.

Every other config starts from ``get_config()`` here and changes what differs.
"""

import ml_collections

# train_baselines trains the baseline denoisers named in eval.defenses (pixel, hgd), if any.
ALL_STAGES = "train_classifier,craft,train_denoiser,train_baselines,evaluate"


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.stages = ALL_STAGES  # any comma-separated subset, run in pipeline order
  # A finished run's workdir whose classifier checkpoint and crafted set this run reuses
  # (ablations: only the denoiser changes); train_classifier and craft are then not run here.
  config.upstream_workdir = ""
  config.log_every_steps = 50
  # Compute dtype of the train steps: float32 or bfloat16 (parameters and optimiser state stay
  # float32). Crafting, attacks and evaluation always run in float32.
  config.compute_dtype = "float32"

  # Devices and processes (cafd_jax/parallel.py, launch/README.md). Batch sizes are global.
  # Time budget of each stage in seconds of wall time from its start, compilation included
  # (0 = none; cafd_jax/budget.py). Training stops at a step boundary with a checkpoint,
  # crafting before a chunk, evaluation before an attack run; a rerun with more time continues.
  config.max_seconds = ml_collections.ConfigDict(dict(
      train_classifier=0.0, craft=0.0, train_denoiser=0.0, train_baselines=0.0, evaluate=0.0))
  # True: a training stage that its budget would cut times its first steps and trains the whole
  # epochs that fit instead, its schedule shortened to match (recorded in DIR/stages.json).
  config.fit_epochs_to_budget = False

  config.parallel = ml_collections.ConfigDict()
  config.parallel.distributed = False  # True: jax.distributed.initialize() (several processes)
  config.parallel.coordinator_address = ""  # empty: detected (TPU pod, SLURM); else HOST:PORT
  config.parallel.num_processes = 1  # with coordinator_address only
  config.parallel.process_id = 0  # with coordinator_address only
  config.parallel.fsdp = False  # split large parameters and optimiser moments over devices
  config.parallel.prefetch_batches = 2  # batches put on devices ahead of the running step

  config.data = ml_collections.ConfigDict()
  config.data.source = "tfds:cifar10"  # synthetic | folder:PATH | tfds:NAME
  config.data.image_size = 32
  config.data.num_train = 0  # 0 = the whole split
  config.data.num_test = 0
  # True: with several processes, each reads only its shard of the training split (examples
  # p, p + P, ...), crafts it and shuffles it locally (another batch order than one process).
  config.data.shard_per_process = False

  config.model = ml_collections.ConfigDict()
  config.model.name = "vgg19"  # vgg_tiny, vgg11/13/16/19, resnet18/34/50, wrn, airbench93/94
  config.model.width = 1.0  # channel multiplier
  config.model.depth = 28  # wrn only
  config.model.widen_factor = 10  # wrn only
  # gap_dense (CAM's head) | flatten_mlp (flatten + two dense layers: needs caf.weights=gradcam*)
  config.model.head = "gap_dense"
  config.model.logit_scale = 1.0  # fixed factor on the logits (airbench: 1/9)
  # airbench93/94 only: "valid" (airbench's maps, 31 -> 15 -> 7 -> 3) or "same" (32 -> ... -> 4)
  config.model.whiten_padding = "valid"
  config.model.mean = (0.4914, 0.4822, 0.4465)  # input normalisation inside the classifier
  config.model.std = (0.2470, 0.2435, 0.2616)

  config.classifier = ml_collections.ConfigDict()
  # sgd | adam | muon (airbench94_muon: Muon for convolution kernels, this SGD for the rest)
  config.classifier.optimizer = "sgd"
  config.classifier.learning_rate = 0.1
  config.classifier.momentum = 0.9
  config.classifier.nesterov = False
  config.classifier.weight_decay = 5e-4
  config.classifier.num_epochs = 200
  config.classifier.batch_size = 128
  # piecewise: lr x lr_decay_factor at each of lr_decay_epochs (the reference); one_cycle: linear
  # warm-up from 0 to lr over warmup_fraction of the steps, then linear decay to 0.
  config.classifier.schedule = "piecewise"
  config.classifier.lr_decay_epochs = (60, 120, 160)
  config.classifier.lr_decay_factor = 0.2
  config.classifier.warmup_fraction = 0.2  # one_cycle only
  config.classifier.label_smoothing = 0.0
  config.classifier.augment = True  # random crop (pad crop_padding) + horizontal flip
  config.classifier.crop_padding = 4
  config.classifier.crop_pad_mode = "constant"  # or "reflect" (airbench's)
  # random: each step flips a random half; alternating (airbench's): a fixed random half in the
  # first epoch, then every image the other way round than in the epoch before.
  config.classifier.flip = "random"
  # airbench93/94 only: the first layer whitens 2x2 patches (set from 5,000 training images, then
  # fixed); see cafd_jax/models/airbench.py.
  config.classifier.whiten_patches = False
  # BatchNorm biases: this times the learning rate, weight decay divided by it (airbench: 64).
  config.classifier.norm_bias_lr_scale = 1.0
  # optimizer=muon: peak learning rate and momentum of the kernels' Muon (same schedule shape).
  config.classifier.muon_learning_rate = 0.24
  config.classifier.muon_momentum = 0.6
  # >1: the batch runs as this many sequential microbatches, one update (fits small devices).
  config.classifier.accumulation_steps = 1
  # Trained variables to start from (an Orbax checkpoint folder or a Flax msgpack file), e.g.
  # for model.name=import:package.module:factory; with num_epochs=0 they are used as they are.
  config.classifier.init_from = ""
  # airbench's lookahead: every 5 steps from this epoch on, the weights move to a slow average
  # (cafd_jax/train/classifier.py: lookahead).
  config.classifier.lookahead = False
  config.classifier.lookahead_start_epoch = 3
  # pgd: adversarial training of the classifier itself (Madry et al.): each batch is replaced by
  # L-inf PGD examples (classifier.pgd, random start) against the current weights; none: clean.
  # ramp_fraction: eps and step size grow linearly over that fraction of the training steps.
  config.classifier.adversary = "none"
  config.classifier.pgd = ml_collections.ConfigDict(dict(eps=8 / 255, step_size=2 / 255,
                                                         steps=7, ramp_fraction=0.0))

  config.caf = ml_collections.ConfigDict()
  config.caf.attack_kind = "weighted_features"  # weighted_features | cam | features
  # The reference code trains the denoiser on plain last-layer features (its CAF variant).
  config.caf.loss_kind = "features"
  config.caf.class_source = "prediction"  # prediction | label
  # Class weights of the CAF: cam (dense kernel of a GAP + dense head) | gradcam | gradcampp.
  config.caf.weights = "cam"
  # Where the features are read: "MODULE_PATH" (its output) or "MODULE_PATH:input"; the
  # default is what the head pools. cam needs the default; gradcam* take any layer.
  config.caf.feature_layer = "head:input"

  config.craft = ml_collections.ConfigDict()  # CAF adversarial examples for the denoiser
  config.craft.num_examples = 0  # 0 = the whole training split
  config.craft.eps = 8 / 255
  config.craft.step_size = 0.01
  config.craft.steps = 100
  config.craft.random_start = True
  config.craft.batch_size = 500

  config.denoiser = ml_collections.ConfigDict()
  config.denoiser.width = 1.0
  config.denoiser.discriminator_width = 1.0
  config.denoiser.learning_rate = 1e-3
  config.denoiser.weight_decay = 2e-4
  config.denoiser.num_epochs = 70
  config.denoiser.batch_size = 300
  config.denoiser.schedule = "piecewise"  # or one_cycle, as for the classifier
  config.denoiser.lr_decay_epochs = (40, 50, 60)
  config.denoiser.lr_decay_factor = 0.3
  config.denoiser.warmup_fraction = 0.2  # one_cycle only
  config.denoiser.caf_weight = 1e3
  config.denoiser.gan_weight = 5e-3
  # The natural images' side of the CAFD / HGD losses (their CAF, their logits) is computed once
  # per stage and kept in host memory beside the crafted set (N x the CAF's size: 330 MB for
  # 20,000 airbench94 maps), sparing each step one classifier pass; False: each step computes it.
  config.denoiser.precompute_targets = True
  # white_box: each CAFD step replaces the first `fraction` of its batch of crafted CAF examples
  # by L-inf PGD examples made online against classifier(denoiser(x)), end to end, with the
  # denoiser's current weights (cafd_jax/train/denoiser.py); none: the crafted examples only.
  config.denoiser.adversary = "none"
  config.denoiser.white_box = ml_collections.ConfigDict(dict(eps=8 / 255, step_size=2 / 255,
                                                             steps=5, fraction=0.5))

  config.eval = ml_collections.ConfigDict()
  config.eval.num_examples = 0  # 0 = the whole test split
  config.eval.batch_size = 500
  config.eval.attacks = "none,pgd,caf"
  # Also: pixel, hgd (baseline denoisers: same U-Net, data and schedule as cafd, trained by the
  # train_baselines stage) and bit_depth, median, jpeg (input transforms).
  config.eval.defenses = "none,cafd"
  config.eval.threat_models = "unseen"  # also: bpda, white_box (adaptive attacks)
  # The defenses attacked under bpda / white_box (comma-separated); empty: every defense.
  config.eval.adaptive_defenses = ""
  # The attacks run under bpda / white_box (comma-separated); empty: every one of eval.attacks.
  config.eval.adaptive_attacks = ""
  # Accuracy-vs-eps curve: sweep_attack re-run at each budget in sweep_eps (empty: none).
  config.eval.sweep_attack = "pgd"
  config.eval.sweep_eps = ()
  config.eval.sweep_threat_models = ""  # those of threat_models the sweep uses; empty: all
  config.eval.figure_attack = "pgd"  # the adversarial column of figures/cam_grid.png
  # Workdirs of other runs on the same data whose classifiers are also attacked behind this
  # run's defenses (transfer: a denoiser trained against one model, used before another).
  config.eval.transfer_workdirs = ()
  # A finished run whose denoisers evaluation reads (empty: this workdir's own).
  config.eval.denoiser_workdir = ""
  config.eval.transfer_attacks = ""  # the attacks on those targets; empty: eval.attacks
  # Input-transform baselines (Xu et al. 2018 on CIFAR-10: 5 bits, 2x2 median; JPEG 75).
  config.eval.bit_depth = ml_collections.ConfigDict(dict(bits=5))
  config.eval.median = ml_collections.ConfigDict(dict(size=2))
  config.eval.jpeg = ml_collections.ConfigDict(dict(quality=75))
  config.eval.pgd = ml_collections.ConfigDict(dict(eps=8 / 255, step_size=2 / 255, steps=20,
                                                   random_start=True))
  config.eval.caf = ml_collections.ConfigDict(dict(eps=8 / 255, step_size=0.01, steps=100,
                                                   random_start=True))
  # Further attacks for config.eval.attacks (their reference defaults; see cafd_jax/attacks/).
  config.eval.fgsm = ml_collections.ConfigDict(dict(eps=8 / 255))
  config.eval.mifgsm = ml_collections.ConfigDict(dict(eps=8 / 255, steps=10, decay=1.0))
  config.eval.pgd_l2 = ml_collections.ConfigDict(dict(eps=0.5, step_size=0.1, steps=20))
  config.eval.cw = ml_collections.ConfigDict(dict(steps=100, confidence=1.0, initial_const=1.0,
                                                  lr=0.01, binary_search_steps=4))
  config.eval.ddn = ml_collections.ConfigDict(dict(steps=100, gamma=0.05, init_norm=1.0))
  # AutoAttack "standard" and its parts (Croce & Hein 2020).
  linf = dict(eps=8 / 255, steps=100, restarts=1)
  config.eval.apgd_ce = ml_collections.ConfigDict(linf)
  config.eval.apgd_dlr = ml_collections.ConfigDict(linf)
  config.eval.apgd_t = ml_collections.ConfigDict(dict(linf, n_target_classes=9))
  config.eval.fab_t = ml_collections.ConfigDict(dict(linf, n_target_classes=9))
  config.eval.square = ml_collections.ConfigDict(dict(eps=8 / 255, n_queries=5000))
  config.eval.autoattack = ml_collections.ConfigDict(dict(
      eps=8 / 255, version="standard", steps=100, n_target_classes=9, square_queries=5000))
  # stAdv as CAFD's evaluation calls it (advertorch: 100 L-BFGS iterations, flow weight 1).
  config.eval.sta = ml_collections.ConfigDict(dict(steps=100))
  # Wong et al. 2019: radius grows from 0.001 by x1.17 every 10 steps; capped at 0.1 here.
  config.eval.wasserstein = ml_collections.ConfigDict(dict(
      eps=0.001, eps_growth=1.17, max_eps=0.1, steps=400, sinkhorn_iters=50))
  return config
