"""CAFD ablations, each one variant of a base config run through the normal pipeline.

    python main.py --config configs/ablations.py:BASE,VARIANT \\
        --workdir runs/ablations/BASE/VARIANT --config.upstream_workdir=runs/BASE

BASE is ``quickstart`` or ``cifar10_cpu``; ``runs/BASE`` is a finished run of that config whose
classifier checkpoint and crafted (CAM-weighted CAF-PGD) training set every variant reuses, so
that only the denoiser changes. Each variant trains one denoiser and evaluates it under unseen
PGD and white-box PGD through it. ``launch/ablations.sh`` runs them all and prints the table
(``python -m cafd_jax.ablations``). Variants:

  feature_loss   the default: last-layer feature distance + GAN (the reference code's loss)
  caf_loss       class-weighted features (CAM) + GAN: the paper's CAF loss
  pixel_loss     pixel MSE, no GAN (the ``pixel`` baseline denoiser)
  no_gan         feature_loss without the GAN term
  caf_no_gan     caf_loss without the GAN term
  gradcam        caf_loss with Grad-CAM class weights
  gradcampp      caf_loss with Grad-CAM++ class weights
  mid_layer      gradcam at the input of the first conv after the last pooling (VGG, airbench)
  early_layer    gradcam at the input of the first conv after the first pooling (VGG, airbench)

To fit all variants in about an hour on 2 cores, the denoisers train 4 epochs on quickstart (not
8) and 1 on cifar10_cpu (not 10), and evaluation uses 250 test images (docs/ablations.md).
"""

from cafd_jax import models
from configs import cifar10_cpu, quickstart

BASES = {"quickstart": quickstart, "cifar10_cpu": cifar10_cpu}
VARIANTS = ("feature_loss", "caf_loss", "pixel_loss", "no_gan", "caf_no_gan", "gradcam",
            "gradcampp", "mid_layer", "early_layer")


def vgg_layer_after_pool(layout, pool_index: int) -> str:
  """``Conv3x3_K:input``: the features right after the ``pool_index``-th pooling of a layout."""
  pools = [index for index, item in enumerate(layout) if item == "M"]
  position = pools[pool_index]
  return f"Conv3x3_{sum(1 for item in layout[:position] if item != 'M')}:input"


def _variant_settings(variant: str, model_name: str) -> dict:
  caf_loss = {"caf.loss_kind": "weighted_features"}
  no_gan = {"denoiser.gan_weight": 0.0}
  if variant in ("mid_layer", "early_layer"):
    pool_index = -1 if variant == "mid_layer" else 0
    if model_name in models.VGG_LAYOUTS:
      layer = vgg_layer_after_pool(models.VGG_LAYOUTS[model_name], pool_index)
    elif model_name in models.AIRBENCH_LAYOUTS:  # each block pools after its first conv
      layer = f"block{range(len(models.AIRBENCH_LAYOUTS[model_name]))[pool_index]}_conv1:input"
    else:
      raise ValueError(f"ablation {variant} is defined for VGG and airbench layouts, not "
                       f"{model_name!r}.")
    return caf_loss | {"caf.weights": "gradcam", "caf.feature_layer": layer}
  settings = {
      "feature_loss": {},
      "caf_loss": caf_loss,
      "pixel_loss": {"eval.defenses": "none,pixel", "eval.adaptive_defenses": "pixel",
                     "stages": "train_baselines,evaluate"},
      "no_gan": no_gan,
      "caf_no_gan": caf_loss | no_gan,
      "gradcam": caf_loss | {"caf.weights": "gradcam"},
      "gradcampp": caf_loss | {"caf.weights": "gradcampp"},
  }
  if variant not in settings:
    raise ValueError(f"unknown ablation variant {variant!r}; choose from {','.join(VARIANTS)}.")
  return settings[variant]


def get_config(arg: str = "quickstart,caf_loss"):
  base_name, _, variant = arg.partition(",")
  if base_name not in BASES:
    raise ValueError(f"ablation base must be one of {','.join(BASES)}, got {base_name!r}.")
  config = BASES[base_name].get_config()
  config.stages = "train_denoiser,evaluate"
  config.eval.attacks = "none,pgd"
  config.eval.defenses = "none,cafd"
  config.eval.threat_models = "unseen,white_box"
  config.eval.adaptive_defenses = "cafd"
  config.eval.sweep_eps = ()
  config.eval.sweep_threat_models = ""
  config.eval.num_examples = 250
  if base_name == "quickstart":
    config.denoiser.num_epochs = 4
    config.denoiser.lr_decay_epochs = (3,)
  else:
    config.denoiser.num_epochs = 1
    config.denoiser.lr_decay_epochs = ()
  for field, value in _variant_settings(variant, config.model.name).items():
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
  return config
