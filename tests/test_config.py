"""Every config file loads and validates; bad values fail with one line naming the field."""

import importlib

import pytest

from cafd_jax import config_checks

CONFIG_NAMES = ["quickstart", "tiny", "cifar10_cpu", "cifar10_cpu_transfer", "cifar10_vgg19",
                "cifar10_resnet50", "cifar10_wrn28_10", "svhn_vgg19"]


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_shipped_configs_validate(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  config_checks.validate(config)


def test_cifar10_cpu_transfer_evaluates_the_second_target_behind_the_first_runs_denoisers():
  transfer = importlib.import_module("configs.cifar10_cpu_transfer")
  trained, evaluated = transfer.get_config("train"), transfer.get_config("evaluate")
  config_checks.validate(evaluated)
  assert trained.stages == "train_classifier" and trained.model.name != evaluated.model.name
  assert evaluated.stages == "evaluate" and evaluated.eval.transfer_workdirs == (transfer.TARGET,)
  assert evaluated.upstream_workdir == evaluated.eval.denoiser_workdir == transfer.UPSTREAM
  assert {"pgd", "autoattack"} <= set(config_checks.split_names(evaluated.eval.transfer_attacks))
  assert evaluated.eval.num_examples >= 2000 and not evaluated.max_seconds.evaluate
  with pytest.raises(ValueError, match="train or evaluate"):
    transfer.get_config("craft")


def test_cifar10_cpu_config_covers_what_the_real_run_must_show():
  from conftest import ROOT, SHARED_CIFAR10  # pylint: disable=g-import-not-at-top
  config = importlib.import_module("configs.cifar10_cpu").get_config()
  kind, path = config.data.source.split(":", 1)
  assert kind == "folder" and (ROOT / path).resolve() == SHARED_CIFAR10.resolve()
  assert config.model.name == "airbench94"
  assert config.classifier.whiten_patches and config.classifier.lookahead
  assert config.classifier.optimizer == "muon" and config.classifier.flip == "alternating"
  assert config.fit_epochs_to_budget  # a slow machine trains fewer whole epochs, not a cut schedule
  assert sum(config.max_seconds.values()) <= 8900  # 2 h 30 min in all, start-up included
  assert config.craft.num_examples >= 20000 and config.craft.steps >= 20
  assert config.denoiser.num_epochs >= 10
  assert config.eval.num_examples >= 2000
  attacks = config_checks.split_names(config.eval.attacks)
  assert {"pgd", "cw", "ddn", "autoattack", "caf"} <= set(attacks)
  assert config.eval.pgd.steps == 20 and config.eval.autoattack.version == "fast"
  assert {"unseen", "white_box"} <= set(config_checks.split_names(config.eval.threat_models))
  assert "pgd" in config_checks.split_names(config.eval.adaptive_attacks)
  assert {"none", "cafd", "cafd_caf", "pixel", "hgd"} <= set(
      config_checks.split_names(config.eval.defenses))
  assert len(config.eval.sweep_eps) >= 2  # an accuracy-vs-eps curve
  config_checks.validate(config)


def test_reference_hyper_parameters():
  config = importlib.import_module("configs.cifar10_vgg19").get_config()
  assert config.model.name == "vgg19"
  assert (config.classifier.optimizer, config.classifier.learning_rate,
          config.classifier.momentum, config.classifier.weight_decay) == ("sgd", 0.1, 0.9, 5e-4)
  assert config.classifier.num_epochs == 200
  assert tuple(config.classifier.lr_decay_epochs) == (60, 120, 160)
  assert config.classifier.lr_decay_factor == 0.2
  assert (config.denoiser.learning_rate, config.denoiser.num_epochs,
          config.denoiser.batch_size) == (1e-3, 70, 300)
  assert tuple(config.denoiser.lr_decay_epochs) == (40, 50, 60)
  assert config.denoiser.lr_decay_factor == 0.3
  assert (config.denoiser.caf_weight, config.denoiser.gan_weight) == (1e3, 5e-3)
  assert (config.craft.eps, config.craft.step_size, config.craft.steps) == (8 / 255, 0.01, 100)


@pytest.mark.parametrize("base", ["quickstart", "cifar10_cpu"])
def test_every_ablation_variant_validates(base):
  from configs import ablations  # pylint: disable=g-import-not-at-top
  seen = set()
  for variant in ablations.VARIANTS:
    config = ablations.get_config(f"{base},{variant}")
    config.upstream_workdir = "runs/" + base
    config_checks.validate(config)
    seen.add((config.caf.loss_kind, config.caf.weights, config.caf.feature_layer,
              config.denoiser.gan_weight, config.eval.defenses))
  assert len(seen) == len(ablations.VARIANTS)  # every variant changes something
  with pytest.raises(ValueError, match="variant"):
    ablations.get_config(f"{base},no_such_variant")


@pytest.mark.parametrize("field, value, needle", [
    ("stages", "train,evaluate", "config.stages"),
    ("stages", "", "config.stages"),
    ("data.source", "s3:bucket", "config.data.source"),
    ("model.name", "vgg7", "config.model.name"),
    ("model.width", 0.0, "config.model.width"),
    ("classifier.batch_size", 0, "config.classifier.batch_size"),
    ("classifier.optimizer", "lbfgs", "config.classifier.optimizer"),
    ("denoiser.learning_rate", -1.0, "config.denoiser.learning_rate"),
    ("caf.loss_kind", "gradcam", "config.caf.loss_kind"),
    ("caf.class_source", "oracle", "config.caf.class_source"),
    ("caf.weights", "scorecam", "config.caf.weights"),
    ("caf.feature_layer", ":input", "config.caf.feature_layer"),
    ("caf.feature_layer", "BasicBlock_3", "config.caf.weights=cam"),  # cam: head input only
    ("model.head", "flatten_mlp", "config.caf.weights=cam"),  # no GAP + dense head for CAM
    ("model.head", "attention", "config.model.head"),
    ("upstream_workdir", "runs/quickstart", "config.upstream_workdir"),  # with all stages
    ("eval.attacks", "pgd,jsma", "config.eval.attacks"),
    ("eval.defenses", "randomized_smoothing", "config.eval.defenses"),
    ("eval.threat_models", "unseen,black_box", "config.eval.threat_models"),
    ("eval.sweep_threat_models", "unseen,grey_box", "config.eval.sweep_threat_models"),
    ("data.num_train", -5, "config.data.num_train"),
    ("compute_dtype", "float16", "config.compute_dtype"),
    ("classifier.accumulation_steps", 3, "config.classifier.accumulation_steps"),
    ("parallel.prefetch_batches", -1, "config.parallel.prefetch_batches"),
])
def test_bad_values_raise_one_clear_line(tiny_config, field, value, needle):
  section, _, name = field.rpartition(".")
  target = tiny_config[section] if section else tiny_config
  target[name] = value
  with pytest.raises(config_checks.ConfigError) as error:
    config_checks.validate(tiny_config)
  assert needle in str(error.value) and "\n" not in str(error.value)


def test_muon_needs_a_positive_learning_rate(tiny_config):
  tiny_config.classifier.optimizer = "muon"
  config_checks.validate(tiny_config)
  tiny_config.classifier.muon_learning_rate = 0.0
  with pytest.raises(config_checks.ConfigError, match="config.classifier.muon_learning_rate"):
    config_checks.validate(tiny_config)
