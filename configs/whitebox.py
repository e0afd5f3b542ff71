"""White-box defenses measured alike: adaptive CAFD against PGD adversarial training of the
classifier at equal compute, next to plain CAFD and HGD (issue 27).

    python main.py --config configs/whitebox.py:BASE,VARIANT --workdir runs/whitebox/BASE/VARIANT

BASE is ``quickstart`` or ``cifar10_cpu``; ``runs/BASE`` (``--config.upstream_workdir`` and the
fields below to change it) is a finished run of that config, whose classifier, crafted set and
denoisers the variants start from. Variants:

  denoisers               runs/BASE's own CAFD and HGD denoisers (eval.denoiser_workdir), no
                          training
  adaptive_cafd           CAFD trained with online white-box examples (denoiser.adversary) on
                          half of each batch, in place of crafted CAF examples
  adversarial_classifier  runs/BASE's classifier (classifier.init_from) fine-tuned by PGD
                          adversarial training (classifier.adversary=pgd) for as many
                          example-gradients as adaptive_cafd's training
                          (equal_compute_training: whole epochs of the training set when they
                          come within COMPUTE_TOLERANCE of it, else the epochs on a subset), at
                          a batch of at most FINE_TUNE_BATCH, a tenth of the learning rate
                          per example, eps ramped over RAMP_FRACTION of the steps, all layers
                          trained
  adaptive_cafd_strong, adversarial_classifier_strong
                          the same two with the stronger inner attack STRONG (10 PGD steps on
                          every example of each batch: no crafted CAF examples left), the
                          classifier again at the adaptive denoiser's compute

Every variant runs its stages to the end (no max_seconds budget: their times are in the table)
and is evaluated on the same grid: clean, PGD and AutoAttack unseen, white-box (end
to end through the defense) and BPDA, and the score-based Square attack as a check on masked
gradients. On 2 CPU cores AutoAttack runs as "fast" (APGD-CE then APGD-T, 20 steps, 3 target
classes; standard AutoAttack's 100 steps, 9 targets and its own Square would take hours per
defense), Square with SQUARE_QUERIES queries, on EVAL_EXAMPLES test images. The denoisers are
deterministic, so EOT (expectation over randomness) would equal the white-box rows.

On cifar10_cpu the adaptive denoiser trains ADAPTIVE_EPOCHS["cifar10_cpu"] epochs (its step,
5 PGD steps through the U-Net and airbench94 on half of each batch, takes about 2 s on 2 cores
against 0.53 s for plain CAFD's); the three standard variants then took about 2.5 h on 2
cores (docs/results.md), and the strong pair is measured on the quickstart only.
"""

import math

import ml_collections

from configs import cifar10_cpu, quickstart

BASES = {"quickstart": quickstart, "cifar10_cpu": cifar10_cpu}
VARIANTS = ("denoisers", "adaptive_cafd", "adversarial_classifier", "adaptive_cafd_strong",
            "adversarial_classifier_strong")
STANDARD = dict(eps=8 / 255, step_size=2 / 255, steps=5, fraction=0.5)  # denoiser.white_box
STRONG = dict(STANDARD, steps=10, fraction=1.0)  # the *_strong variants'
STRONG_SUFFIX = "_strong"
CIFAR10_TRAIN_SIZE = 50_000  # what data.num_train = 0 (the whole split) means for both bases
EVAL_EXAMPLES = 500
SQUARE_QUERIES = 500
ADAPTIVE_EPOCHS = {"cifar10_cpu": 4}  # the base's own denoiser.num_epochs where absent
COMPUTE_TOLERANCE = 0.15
FINE_TUNE_BATCH = 128  # the PGD-AT fine-tune's largest batch (Madry et al. train at 128)
RAMP_FRACTION = 0.3  # of the PGD-AT fine-tune's steps, over which its eps grows to 8/255


def training_examples(config: ml_collections.ConfigDict) -> int:
  return config.data.num_train or CIFAR10_TRAIN_SIZE


def crafted_examples(config: ml_collections.ConfigDict) -> int:
  return min(config.craft.num_examples or training_examples(config), training_examples(config))


def adaptive_gradient_evaluations(config: ml_collections.ConfigDict) -> int:
  """Example-gradients of adaptive CAFD's training: per step, ``steps`` PGD gradients for the
  online share of the batch and one training gradient for the whole batch."""
  train, options = config.denoiser, config.denoiser.white_box
  online = max(1, round(options.fraction * train.batch_size))
  steps = train.num_epochs * math.ceil(crafted_examples(config) / train.batch_size)
  return steps * (online * options.steps + train.batch_size)


def equal_compute_training(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """Epochs and training examples (``data.num_train``) of PGD adversarial training (``steps``
  + 1 gradients per example) that spend as many example-gradients as
  ``adaptive_gradient_evaluations``: whole epochs of the base's training set when their
  count is within COMPUTE_TOLERANCE of it, else the fewest epochs of a subset that match it."""
  target = adaptive_gradient_evaluations(config)
  per_example = config.classifier.pgd.steps + 1
  per_epoch = training_examples(config) * per_example
  epochs = max(1, round(target / per_epoch))
  if abs(epochs * per_epoch - target) <= COMPUTE_TOLERANCE * target:
    return epochs, config.data.num_train
  epochs = math.ceil(target / per_epoch)
  return epochs, round(target / (epochs * per_example))


def _evaluation_grid(config: ml_collections.ConfigDict, defenses: str) -> None:
  config.eval.num_examples = EVAL_EXAMPLES
  config.eval.square.n_queries = SQUARE_QUERIES
  config.eval.autoattack.update(dict(version="fast", steps=20, n_target_classes=3))
  config.eval.attacks = "none,pgd,autoattack,square"
  config.eval.defenses = defenses
  config.eval.threat_models = "unseen,white_box,bpda"
  config.eval.adaptive_defenses = ""
  config.eval.adaptive_attacks = "pgd,autoattack,square"
  config.eval.sweep_eps = ()
  config.eval.sweep_threat_models = ""


def get_config(arg: str = "quickstart,adaptive_cafd"):
  base_name, _, variant = arg.partition(",")
  if base_name not in BASES:
    raise ValueError(f"whitebox base must be one of {','.join(BASES)}, got {base_name!r}.")
  if variant not in VARIANTS:
    raise ValueError(f"unknown whitebox variant {variant!r}; choose from {','.join(VARIANTS)}.")
  config = BASES[base_name].get_config()
  config.max_seconds.update({stage: 0.0 for stage in config.max_seconds})  # each runs to the end
  strong = variant.endswith(STRONG_SUFFIX)
  variant = variant.removesuffix(STRONG_SUFFIX)
  config.denoiser.white_box.update(STRONG if strong else STANDARD)
  config.classifier.pgd.update(dict(eps=8 / 255, step_size=2 / 255, steps=7))
  base_workdir = f"runs/{base_name}"
  if variant != "denoisers":  # the adaptive denoiser's epochs set both trainings' compute
    config.denoiser.num_epochs = ADAPTIVE_EPOCHS.get(base_name, config.denoiser.num_epochs)
  if variant == "denoisers":
    config.stages = "evaluate"
    config.upstream_workdir = config.eval.denoiser_workdir = base_workdir
    _evaluation_grid(config, "none,cafd,hgd")
  elif variant == "adaptive_cafd":
    config.stages = "train_denoiser,evaluate"
    config.upstream_workdir = base_workdir
    config.denoiser.adversary = "white_box"
    _evaluation_grid(config, "none,cafd")
  else:
    epochs, config.data.num_train = equal_compute_training(config)
    config.stages = "train_classifier,evaluate"
    config.classifier.adversary = "pgd"
    config.classifier.init_from = f"{base_workdir}/checkpoints/classifier"
    config.classifier.num_epochs = epochs
    config.classifier.schedule = "one_cycle"
    # Fine-tuning a trained classifier: a tenth of its learning rate per example, at a batch of
    # at most FINE_TUNE_BATCH, eps ramped up over RAMP_FRACTION of the steps, every layer
    # trained (airbench's patch whitening too, whose frozen filters amplify the faintest
    # directions of the image), by plain SGD without the from-scratch tricks (Muon, lookahead,
    # airbench's 64x BatchNorm-bias step, alternating flips). Without them cifar10_cpu's
    # fine-tune stayed at chance loss.
    batch = min(config.classifier.batch_size, FINE_TUNE_BATCH)
    config.classifier.learning_rate *= batch / config.classifier.batch_size / 10
    config.classifier.batch_size = batch
    config.classifier.pgd.ramp_fraction = RAMP_FRACTION
    config.classifier.whiten_patches = False  # init_from brings the whitening filters
    config.classifier.lookahead = False
    config.classifier.norm_bias_lr_scale = 1.0
    config.classifier.optimizer = "sgd"
    config.classifier.flip = "random"
    config.log_every_steps = min(config.log_every_steps, 20)
    _evaluation_grid(config, "none")
  return config
