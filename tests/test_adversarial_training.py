"""Adaptive CAFD (denoiser.adversary=white_box) and PGD adversarial training of the classifier
(classifier.adversary=pgd): the inner attacks raise the loss they attack, the steps train, the
switches are validated and reach the pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafd_jax import config_checks, factory, losses, pipeline
from cafd_jax.train import classifier as classifier_train
from cafd_jax.train import common
from cafd_jax.train import denoiser as denoiser_train
from conftest import run_main  # pylint: disable=g-import-not-at-top

ADVERSARY = denoiser_train.WhiteBoxAdversary(eps=8 / 255, step_size=2 / 255, steps=5,
                                              fraction=0.5)


@pytest.fixture(scope="module")
def defended(trained_tiny):
  """(classifier, its variables, denoiser state, images, labels) of the tiny trained model."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  model, variables, test_set, _ = trained_tiny
  states = factory.denoiser_states(tiny.get_config(), jax.random.key(1), steps_per_epoch=10)
  images = jnp.asarray(test_set.images[:32])
  labels = jnp.asarray(test_set.labels[:32])
  return model, variables, states, images, labels


def _defended_loss(model, variables, denoiser_state, images, labels):
  denoised = denoiser_state.apply_fn({"params": denoiser_state.params,
                                      "batch_stats": denoiser_state.batch_stats}, images,
                                     train=False)
  return float(jnp.mean(losses.cross_entropy(model.apply(variables, denoised), labels)))


def test_white_box_examples_raise_the_defended_models_loss(defended):
  # Against its own random start: with a gradient stopped anywhere between the loss and the
  # input (denoiser or classifier), PGD's sign steps are zero and the two losses are equal.
  model, variables, (denoiser_state, _), images, labels = defended
  key = jax.random.key(3)
  attacked = denoiser_train.white_box_examples(denoiser_state, model, variables, images, labels,
                                               key, ADVERSARY)
  start = denoiser_train.white_box_examples(
      denoiser_state, model, variables, images, labels, key,
      denoiser_train.WhiteBoxAdversary(eps=ADVERSARY.eps, step_size=ADVERSARY.step_size,
                                       steps=0))
  assert float(jnp.max(jnp.abs(attacked - images))) <= ADVERSARY.eps + 1e-6
  clean = _defended_loss(model, variables, denoiser_state, images, labels)
  random_start = _defended_loss(model, variables, denoiser_state, start, labels)
  adversarial = _defended_loss(model, variables, denoiser_state, attacked, labels)
  assert adversarial > random_start + 0.5 and adversarial > clean + 0.5, (
      clean, random_start, adversarial)


def test_adaptive_step_trains_on_online_examples_within_eps(defended):
  model, variables, states, images, labels = defended
  step = denoiser_train.make_train_step(model, caf_kind="features", class_source="label",
                                        caf_weight=1e3, gan_weight=5e-3, adversary=ADVERSARY)
  before = [np.asarray(leaf).copy() for leaf in jax.tree.leaves(states[0].params)]
  x_adv = jnp.clip(images + 0.01, 0, 1)  # stand-in for the crafted CAF examples
  new_states, metrics = step(jax.tree.map(jnp.copy, states), variables, x_adv, images, labels,
                             jax.random.key(0))
  assert 0 < float(metrics["online_linf"]) <= ADVERSARY.eps + 1e-6
  assert np.isfinite(float(metrics["loss"]))
  assert any(not np.allclose(new, old)
             for new, old in zip(jax.tree.leaves(new_states[0].params), before))
  with pytest.raises(ValueError, match="PRNG key"):
    step(jax.tree.map(jnp.copy, states), variables, x_adv, images, labels)
  assert ADVERSARY.count(32) == 16 and ADVERSARY.count(1) == 1


def test_pgd_examples_raise_the_classifiers_loss_and_the_step_trains(defended):
  model, variables, _, images, labels = defended
  state = common.create_state(model, jax.random.key(0), images[:1],
                              common.make_optimizer("adam", 1e-3, weight_decay=0.0))
  copied = jax.tree.map(jnp.copy, variables)  # the step donates its state; keep the fixture's
  state = state.replace(params=copied["params"],
                        batch_stats=copied.get("batch_stats", state.batch_stats))
  attacked = classifier_train.pgd_examples(state, images, labels, jax.random.key(1),
                                           8 / 255, 2 / 255, 5)
  loss = lambda x: float(jnp.mean(losses.cross_entropy(model.apply(variables, x), labels)))
  assert float(jnp.max(jnp.abs(attacked - images))) <= 8 / 255 + 1e-6
  assert loss(attacked) > loss(images) + 0.5
  step = classifier_train.make_step_fn(False, adversary=(8 / 255, 2 / 255, 3, 0))
  new_state, metrics = step(state, (images, labels), jax.random.key(2))
  assert np.isfinite(float(metrics["loss"]))
  assert float(metrics["loss"]) > loss(images)  # it trained on the attacked batch


def test_a_pgd_ramp_starts_adversarial_training_at_a_small_eps(defended, monkeypatch):
  model, variables, _, images, labels = defended
  state = common.create_state(model, jax.random.key(0), images[:1],
                              common.make_optimizer("adam", 1e-3, weight_decay=0.0))
  state = state.replace(params=jax.tree.map(jnp.copy, variables["params"]),
                        batch_stats=jax.tree.map(jnp.copy, variables.get("batch_stats", {})))
  seen = []
  attack = classifier_train.pgd_examples
  monkeypatch.setattr(classifier_train, "pgd_examples",
                      lambda *args: seen.append(attack(*args)) or seen[-1])
  for ramp_steps in (0, 4):
    classifier_train.train_step.__wrapped__(  # unjitted, to see the examples it trains on
        jax.tree.map(jnp.copy, state), images, labels, jax.random.key(2), False,
        adversary=(8 / 255, 2 / 255, 3, ramp_steps))
  full, ramped = (float(jnp.max(jnp.abs(x - images))) for x in seen)
  assert 0.75 * 8 / 255 < full <= 8 / 255 + 1e-6
  assert ramped <= 8 / 255 / 4 + 1e-6  # step 1 of 4


@pytest.mark.parametrize("section, field, value, needle", [
    ("denoiser", "adversary", "black_box", "config.denoiser.adversary must be none or white_box"),
    ("classifier", "adversary", "trades", "config.classifier.adversary must be none or pgd"),
    ("denoiser", "eps", 0.0, "config.denoiser.white_box.eps"),
    ("denoiser", "steps", 0, "config.denoiser.white_box.steps"),
    ("denoiser", "fraction", 1.5, "config.denoiser.white_box.fraction"),
    ("classifier", "step_size", -1.0, "config.classifier.pgd.step_size"),
    ("classifier", "steps", -3, "config.classifier.pgd.steps"),
    ("classifier", "ramp_fraction", 1.5, "config.classifier.pgd.ramp_fraction"),
])
def test_adversary_switches_are_validated(tiny_config, section, field, value, needle):
  kind = {"denoiser": "white_box", "classifier": "pgd"}[section]
  tiny_config[section].adversary = kind
  config_checks.validate(tiny_config)  # the defaults are valid
  if field == "adversary":
    tiny_config[section].adversary = value
  else:
    tiny_config[section][kind][field] = value
  with pytest.raises(config_checks.ConfigError) as error:
    config_checks.validate(tiny_config)
  assert needle in str(error.value) and "\n" not in str(error.value)


def test_switches_reach_the_pipelines_steps(tiny_config):
  assert pipeline.white_box_adversary(tiny_config) is None
  tiny_config.denoiser.adversary = "white_box"
  assert pipeline.white_box_adversary(tiny_config) == denoiser_train.WhiteBoxAdversary(
      eps=8 / 255, step_size=2 / 255, steps=5, fraction=0.5)


def test_tiny_pipeline_with_both_adversaries(tmp_path):
  result = run_main(tmp_path / "work", "--config.classifier.adversary=pgd",
                    "--config.classifier.pgd.steps=2", "--config.denoiser.adversary=white_box",
                    "--config.denoiser.white_box.steps=2", "--config.eval.attacks=none,pgd")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "online_linf" in result.stdout


@pytest.mark.parametrize("base", ["quickstart", "cifar10_cpu"])
def test_whitebox_variants_validate_and_spend_equal_compute(base):
  from configs import whitebox  # pylint: disable=g-import-not-at-top
  for variant in whitebox.VARIANTS:
    config = whitebox.get_config(f"{base},{variant}")
    config_checks.validate(config)
    assert not any(config.max_seconds.values())  # no stage cut: the table's times are whole
  epochs = {}
  for suffix in ("", whitebox.STRONG_SUFFIX):
    adaptive = whitebox.get_config(f"{base},adaptive_cafd{suffix}")
    trained = whitebox.get_config(f"{base},adversarial_classifier{suffix}")
    assert adaptive.denoiser.adversary == "white_box" and trained.classifier.adversary == "pgd"
    assert trained.classifier.norm_bias_lr_scale == 1.0 and not trained.classifier.lookahead
    assert trained.classifier.batch_size <= whitebox.FINE_TUNE_BATCH
    assert trained.classifier.pgd.ramp_fraction > 0 and not trained.classifier.whiten_patches
    per_epoch = whitebox.training_examples(trained) * (trained.classifier.pgd.steps + 1)
    spent = trained.classifier.num_epochs * per_epoch
    target = whitebox.adaptive_gradient_evaluations(adaptive)
    assert adaptive.denoiser.num_epochs == trained.denoiser.num_epochs
    assert abs(spent - target) <= whitebox.COMPUTE_TOLERANCE * target, (spent, target)
    epochs[suffix] = (adaptive.denoiser.white_box.steps, trained.classifier.num_epochs)
  strong = whitebox.get_config(f"{base},adaptive_cafd{whitebox.STRONG_SUFFIX}").denoiser.white_box
  assert (strong.steps, strong.fraction) == (10, 1.0)
  assert epochs[whitebox.STRONG_SUFFIX][1] >= epochs[""][1]  # more compute for the anchor too
  with pytest.raises(ValueError, match="variant"):
    whitebox.get_config(f"{base},no_such_variant")


def test_whitebox_table_reads_each_variants_report(tmp_path):
  from cafd_jax import io_utils, whitebox  # pylint: disable=g-import-not-at-top
  row = lambda attack, defense, threat, accuracy: {
      "attack": attack, "defense": defense, "threat_model": threat, "model": "vgg_tiny",
      "eps": 8 / 255, "accuracy": accuracy, "n": 1000}
  reports = {
      "denoisers": [row("none", "none", "unseen", 0.9), row("pgd", "cafd", "white_box", 0.01),
                    row("pgd", "none", "unseen", 0.0)],
      "adaptive_cafd": [row("pgd", "cafd", "white_box", 0.25)],
      "adversarial_classifier": [row("pgd", "none", "unseen", 0.4)],
  }
  for variant, results in reports.items():
    io_utils.write_json(tmp_path / variant / "report.json", {
        "results": results, "metadata": {"stage_seconds": {"train_denoiser": 12.0}}})
  lines = whitebox.table(str(tmp_path)).splitlines()
  by_label = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in lines[2:]}
  column = whitebox.COLUMNS.index("PGD white-box")
  assert by_label["adaptive CAFD"][column].startswith("25.0 (")
  assert by_label["CAFD"][column].startswith("1.0 (")
  # The undefended classifiers are the same model under every threat model: unseen rows.
  assert by_label["PGD-AT classifier"][column].startswith("40.0 (")
  assert by_label["no defense"][column].startswith("0.0 (")
  assert by_label["adaptive CAFD"][-1].strip(" |") == "12"
