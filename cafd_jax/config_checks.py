"""Validation of a config before any work starts: one clear line per mistake."""

import ml_collections

from cafd_jax import augment, budget, cam, data, evaluate, models
from cafd_jax.models import taps

# Pipeline order. ``report`` only rebuilds tables and figures from DIR/report.json.
STAGES = ("train_classifier", "craft", "train_denoiser", "train_baselines", "evaluate", "report")
SCHEDULES = ("piecewise", "one_cycle")


class ConfigError(ValueError):
  """A config value is invalid; the message names the field and the fix."""


def split_names(text: str) -> list[str]:
  """'a, b,c' -> ['a', 'b', 'c']."""
  return [name.strip() for name in str(text).split(",") if name.strip()]


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _check_names(field: str, value: str, allowed) -> None:
  names = split_names(value)
  _require(bool(names), f"{field} is empty; give a comma-separated subset of {','.join(allowed)}.")
  for name in names:
    _require(name in allowed, f"{field}: unknown {name!r}; choose from {','.join(allowed)}.")


def _positive(field: str, value) -> None:
  _require(isinstance(value, (int, float)) and value > 0, f"{field} must be > 0, got {value!r}.")


def _non_negative(field: str, value) -> None:
  _require(isinstance(value, (int, float)) and value >= 0, f"{field} must be >= 0, got {value!r}.")


def _check_adversary(config: ml_collections.ConfigDict, section: str, kind: str) -> None:
  """config.SECTION.adversary is none or KIND, and config.SECTION.KIND's PGD settings hold."""
  adversary = config[section].get("adversary", "none")
  _require(adversary in ("none", kind), f"config.{section}.adversary must be none or {kind}, "
                                        f"got {adversary!r}.")
  if adversary == "none":
    return
  options = config[section].get(kind, None)
  _require(options is not None, f"config.{section}.adversary={kind} needs config.{section}.{kind}"
                                f" (eps, step_size, steps).")
  for field in ("eps", "step_size"):
    value = options.get(field, None)
    _require(isinstance(value, (int, float)) and 0 < value <= 1,
             f"config.{section}.{kind}.{field} must be in (0, 1], got {value!r}.")
  steps = options.get("steps", None)
  _require(isinstance(steps, int) and steps >= 1,
           f"config.{section}.{kind}.steps must be an int >= 1, got {steps!r}.")
  fraction = options.get("fraction", 1.0)
  _require(isinstance(fraction, (int, float)) and 0 < fraction <= 1,
           f"config.{section}.{kind}.fraction must be in (0, 1], got {fraction!r}.")
  ramp = options.get("ramp_fraction", 0.0)
  _require(isinstance(ramp, (int, float)) and 0 <= ramp <= 1,
           f"config.{section}.{kind}.ramp_fraction must be in [0, 1], got {ramp!r}.")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first invalid field."""
  _check_names("config.stages", config.stages, STAGES)
  if config.get("upstream_workdir", ""):
    _require(not {"train_classifier", "craft"} & set(split_names(config.stages)),
             "config.upstream_workdir reuses that run's classifier and crafted set; drop "
             "train_classifier and craft from config.stages.")
  try:
    kind, _ = data.parse_source(config.data.source)
  except data.DataError as error:
    raise ConfigError(f"config.data.source: {error}") from None
  if kind == "synthetic":
    _require(config.data.num_train > 0 and config.data.num_test > 0,
             "config.data.num_train and .num_test must be > 0 for the synthetic source.")
  _positive("config.data.image_size", config.data.image_size)
  for field in ("data.num_train", "data.num_test", "craft.num_examples", "eval.num_examples"):
    section, name = field.split(".")
    _non_negative(f"config.{field}", config[section][name])
  _require(config.model.name in models.CLASSIFIERS or config.model.name.startswith("import:"),
           f"config.model.name: unknown {config.model.name!r}; choose from "
           f"{','.join(models.CLASSIFIERS)} or import:package.module:factory.")
  _positive("config.model.width", config.model.width)
  _positive("config.model.logit_scale", config.model.get("logit_scale", 1.0))
  padding = config.model.get("whiten_padding")  # absent in configs recorded before it
  _require(padding is None or padding in models.airbench.WHITEN_PADDINGS,
           f"config.model.whiten_padding must be one of {models.airbench.WHITEN_PADDINGS}, got "
           f"{padding!r}.")
  _require(len(config.model.mean) == 3 and len(config.model.std) == 3
           and all(s > 0 for s in config.model.std),
           "config.model.mean and .std need three values each, std > 0.")
  for section in ("classifier", "denoiser"):
    for name in ("learning_rate", "num_epochs", "batch_size"):
      if section == "classifier" and name == "num_epochs" and config.classifier.get("init_from"):
        _non_negative("config.classifier.num_epochs", config.classifier.num_epochs)  # 0: as is
        continue
      _positive(f"config.{section}.{name}", config[section][name])
    _non_negative(f"config.{section}.weight_decay", config[section].weight_decay)
  _require(config.classifier.optimizer in ("sgd", "adam", "muon"),
           "config.classifier.optimizer must be sgd, adam or muon, got "
           f"{config.classifier.optimizer!r}.")
  if config.classifier.optimizer == "muon":
    _positive("config.classifier.muon_learning_rate", config.classifier.muon_learning_rate)
  for name in ("attack_kind", "loss_kind"):
    _require(config.caf[name] in cam.CAF_KINDS,
             f"config.caf.{name} must be one of {','.join(cam.CAF_KINDS)}, got {config.caf[name]!r}.")
  _require(config.caf.class_source in cam.CLASS_SOURCES,
           f"config.caf.class_source must be one of {','.join(cam.CLASS_SOURCES)}.")
  _require(config.model.head in models.HEADS,
           f"config.model.head must be one of {','.join(models.HEADS)}, got {config.model.head!r}.")
  _require(config.caf.weights in cam.WEIGHT_METHODS,
           f"config.caf.weights must be one of {','.join(cam.WEIGHT_METHODS)}, "
           f"got {config.caf.weights!r}.")
  try:
    taps.parse_layer(config.caf.feature_layer)
  except ValueError as error:
    raise ConfigError(f"config.{error}") from None
  if config.caf.weights == "cam" and not config.model.name.startswith("import:"):
    _require(config.model.head == "gap_dense" and config.caf.feature_layer == taps.DEFAULT_LAYER,
             "config.caf.weights=cam needs model.head=gap_dense and caf.feature_layer="
             f"{taps.DEFAULT_LAYER}; use caf.weights=gradcam or gradcampp otherwise.")
  for section in (config.craft, config.eval.pgd, config.eval.caf):
    _non_negative("attack eps", section.eps)
    _non_negative("attack step_size", section.step_size)
    _require(isinstance(section.steps, int) and section.steps >= 0, "attack steps must be an int >= 0.")
  _positive("config.craft.batch_size", config.craft.batch_size)
  _require(config.get("compute_dtype", "float32") in ("float32", "bfloat16"),
           "config.compute_dtype must be float32 or bfloat16.")
  steps = config.classifier.get("accumulation_steps", 1)
  _require(isinstance(steps, int) and steps >= 1 and config.classifier.batch_size % steps == 0,
           "config.classifier.accumulation_steps must be an int >= 1 that divides "
           "config.classifier.batch_size.")
  _require(config.parallel.prefetch_batches >= 0, "config.parallel.prefetch_batches must be >= 0.")
  budgets = config.get("max_seconds", None)
  if budgets is not None:
    for stage in budgets:
      _require(stage in budget.STAGES, f"config.max_seconds.{stage}: no such stage; budgets are "
                                       f"for {','.join(budget.STAGES)}.")
      _non_negative(f"config.max_seconds.{stage}", budgets[stage])
  _require(isinstance(config.get("fit_epochs_to_budget", False), bool),
           "config.fit_epochs_to_budget must be True or False.")
  for section in ("classifier", "denoiser"):
    train = config[section]
    _require(train.get("schedule", "piecewise") in SCHEDULES,
             f"config.{section}.schedule must be one of {','.join(SCHEDULES)}, "
             f"got {train.get('schedule')!r}.")
    fraction = train.get("warmup_fraction", 0.2)
    _require(isinstance(fraction, (int, float)) and 0 <= fraction <= 1,
             f"config.{section}.warmup_fraction must be in [0, 1], got {fraction!r}.")
  smoothing = config.classifier.get("label_smoothing", 0.0)
  _require(isinstance(smoothing, (int, float)) and 0 <= smoothing < 1,
           f"config.classifier.label_smoothing must be in [0, 1), got {smoothing!r}.")
  _require(not config.classifier.get("whiten_patches", False)
           or config.model.name in models.AIRBENCH_LAYOUTS,
           f"config.classifier.whiten_patches needs a model with a patch-whitening layer "
           f"({','.join(models.AIRBENCH_LAYOUTS)}), not {config.model.name!r}; set it False.")
  _positive("config.classifier.norm_bias_lr_scale",
            config.classifier.get("norm_bias_lr_scale", 1.0))
  padding = config.classifier.get("crop_padding", 4)
  _require(isinstance(padding, int) and 0 <= padding < config.data.image_size,
           f"config.classifier.crop_padding must be an int in [0, image size), got {padding!r}.")
  pad_mode = config.classifier.get("crop_pad_mode", "constant")
  _require(pad_mode in augment.PAD_MODES,
           f"config.classifier.crop_pad_mode must be one of {', '.join(augment.PAD_MODES)}, "
           f"got {pad_mode!r}.")
  flip = config.classifier.get("flip", "random")
  _require(flip in augment.FLIP_MODES,
           f"config.classifier.flip must be one of {', '.join(augment.FLIP_MODES)}, got {flip!r}.")
  _require(flip == "random" or config.classifier.augment,
           f"config.classifier.flip={flip} needs config.classifier.augment=True (without "
           f"augmentation nothing is flipped).")
  _check_adversary(config, "classifier", "pgd")
  _check_adversary(config, "denoiser", "white_box")
  _positive("config.eval.batch_size", config.eval.batch_size)
  _non_negative("config.denoiser.caf_weight", config.denoiser.caf_weight)
  _require(isinstance(config.denoiser.get("precompute_targets", True), bool),
           f"config.denoiser.precompute_targets must be True or False, got "
           f"{config.denoiser.get('precompute_targets')!r}.")
  _non_negative("config.denoiser.gan_weight", config.denoiser.gan_weight)
  _check_names("config.eval.attacks", config.eval.attacks, evaluate.ATTACKS)
  if config.eval.get("transfer_attacks", ""):
    _check_names("config.eval.transfer_attacks", config.eval.transfer_attacks, evaluate.ATTACKS)
  _check_names("config.eval.defenses", config.eval.defenses, evaluate.DEFENSES)
  _check_names("config.eval.threat_models", config.eval.threat_models, evaluate.THREAT_MODELS)
  if split_names(config.eval.get("adaptive_attacks", "")):
    _check_names("config.eval.adaptive_attacks", config.eval.adaptive_attacks, evaluate.ATTACKS)
  if split_names(config.eval.get("adaptive_defenses", "")):
    _check_names("config.eval.adaptive_defenses", config.eval.adaptive_defenses, evaluate.DEFENSES)
  _require(config.eval.get("figure_attack", "pgd") in evaluate.ATTACKS,
           f"config.eval.figure_attack: unknown {config.eval.get('figure_attack')!r}; choose from "
           f"{','.join(evaluate.ATTACKS)}.")
  _require(isinstance(config.eval.get("denoiser_workdir", ""), str),
           "config.eval.denoiser_workdir must be a workdir path (or empty).")
  _require(all(isinstance(path, str) and path
               for path in config.eval.get("transfer_workdirs", ())),
           "config.eval.transfer_workdirs must be a tuple of workdir paths.")
  if split_names(config.eval.get("sweep_threat_models", "")):
    _check_names("config.eval.sweep_threat_models", config.eval.sweep_threat_models,
                 evaluate.THREAT_MODELS)
  if config.eval.sweep_eps and config.eval.sweep_attack not in evaluate.ATTACKS[2:]:
    raise ConfigError(f"config.eval.sweep_attack={config.eval.sweep_attack!r} must name a "
                      f"registered attack with an eps budget, e.g. 'pgd'")
