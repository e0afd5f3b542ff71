"""Train steps learn: classifier loss and the denoiser's CAF loss go down."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafd_jax import attacks, data, factory
from cafd_jax.train import common
from cafd_jax.train import denoiser as denoiser_train


def _loss_history(step, state, arrays, metric, num_steps=25):
  """``metric`` after each of ``num_steps`` calls of ``step(state, *arrays)``."""
  history = []
  for _ in range(num_steps):
    state, metrics = step(state, *arrays)
    history.append(float(metrics[metric]))
  assert np.all(np.isfinite(history))
  return history


def test_denoiser_loss_decreases(trained_tiny, tiny_config):
  model, variables, test_set, _ = trained_tiny
  x_natural = jnp.asarray(test_set.images[:50])
  labels = jnp.asarray(test_set.labels[:50])
  caf_fn = denoiser_train.classifier_caf_fn(model, variables, "weighted_features", "prediction")
  x_adv = attacks.caf_attack(caf_fn, x_natural, labels, jax.random.key(0), steps=5)
  tiny_config.denoiser.learning_rate = 3e-3
  states = factory.denoiser_states(tiny_config, jax.random.key(1), steps_per_epoch=10)
  step = denoiser_train.make_train_step(model, caf_kind="weighted_features",
                                        class_source="prediction", caf_weight=1e3, gan_weight=5e-3)
  history = _loss_history(step, states, (variables, x_adv, x_natural, labels), "caf_loss")
  assert np.mean(history[-5:]) < 0.7 * np.mean(history[:3]), history


def test_classifier_step_reduces_loss(tiny_config):
  from cafd_jax.train import classifier  # pylint: disable=g-import-not-at-top
  dataset = data.make_synthetic(64, seed=3)
  state = factory.classifier_state(tiny_config, 10, jax.random.key(0), steps_per_epoch=1)
  step = classifier.make_step_fn(use_augmentation=True)
  losses = []
  for index in range(15):
    state, metrics = step(state, (dataset.images, dataset.labels), jax.random.key(index))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]


def test_piecewise_schedule_decays_at_epoch_boundaries():
  schedule = common.piecewise_schedule(0.1, steps_per_epoch=10, decay_epochs=(2, 3),
                                       decay_factor=0.2)
  np.testing.assert_allclose([schedule(0), schedule(19), schedule(20), schedule(30)],
                             [0.1, 0.1, 0.02, 0.004], rtol=1e-6)


def test_baseline_losses_are_pixel_mse_and_logit_l1(trained_tiny):
  model, variables, test_set, _ = trained_tiny
  x = jnp.asarray(test_set.images[:8])
  shifted = jnp.clip(x + 0.05 * jnp.sign(jnp.sin(jnp.arange(x.size))).reshape(x.shape), 0, 1)
  pixel = denoiser_train.baseline_loss(model, variables, "pixel", shifted, x)
  np.testing.assert_allclose(pixel, np.mean((np.asarray(shifted) - np.asarray(x)) ** 2), rtol=1e-5)
  hgd = denoiser_train.baseline_loss(model, variables, "hgd", shifted, x)
  logits = lambda images: np.asarray(model.apply(variables, images))
  np.testing.assert_allclose(hgd, np.mean(np.abs(logits(shifted) - logits(x))), rtol=1e-5)
  for name in denoiser_train.BASELINES:
    assert float(denoiser_train.baseline_loss(model, variables, name, x, x)) == 0.0


@pytest.mark.parametrize("name", denoiser_train.BASELINES)
def test_baseline_denoiser_step_reduces_its_loss(trained_tiny, tiny_config, name):
  model, variables, test_set, _ = trained_tiny
  x_natural = jnp.asarray(test_set.images[:50])
  labels = jnp.asarray(test_set.labels[:50])
  noise = jax.random.uniform(jax.random.key(0), x_natural.shape, minval=-0.15, maxval=0.15)
  x_adv = jnp.clip(x_natural + noise, 0, 1)  # strong noise: learnable within a few steps
  tiny_config.denoiser.learning_rate = 3e-3
  state = factory.baseline_denoiser_state(tiny_config, jax.random.key(1), steps_per_epoch=10)
  step = denoiser_train.make_baseline_train_step(model, name)
  history = _loss_history(step, state, (variables, x_adv, x_natural, labels), "loss")
  assert np.mean(history[-5:]) < 0.8 * np.mean(history[:3]), history


def test_label_smoothing_spreads_the_target_over_every_class():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cafd_jax import losses  # pylint: disable=g-import-not-at-top
  logits = jnp.asarray([[2.0, -1.0, 0.5, 0.0]])
  log_p = jax.nn.log_softmax(logits)[0]
  want = -(0.9 * log_p[2] + 0.1 * jnp.mean(log_p))  # 1 - s on the label, s over all 4 classes
  got = losses.cross_entropy(logits, jnp.asarray([2]), label_smoothing=0.1)
  assert float(got[0]) == pytest.approx(float(want), rel=1e-6)
  assert float(losses.cross_entropy(logits, jnp.asarray([2]))[0]) == pytest.approx(float(-log_p[2]))


@pytest.mark.parametrize("name, caf_kind", [("cafd", "features"),
                                             ("cafd_caf", "weighted_features"), ("hgd", None)])
def test_precomputed_natural_targets_give_the_same_step(trained_tiny, tiny_config, name,
                                                        caf_kind):
  model, variables, test_set, _ = trained_tiny
  x_natural = jnp.asarray(test_set.images[:20])
  labels = jnp.asarray(test_set.labels[:20])
  noise = jax.random.uniform(jax.random.key(0), x_natural.shape, minval=-0.03, maxval=0.03)
  x_adv = jnp.clip(x_natural + noise, 0, 1)
  if caf_kind is None:
    step = denoiser_train.make_baseline_train_step(model, name)
    fresh = lambda: factory.baseline_denoiser_state(tiny_config, jax.random.key(1), 10)
  else:
    step = denoiser_train.make_train_step(model, caf_kind=caf_kind, class_source="prediction",
                                          caf_weight=1e3, gan_weight=5e-3)
    fresh = lambda: factory.denoiser_states(tiny_config, jax.random.key(1), steps_per_epoch=10)
  target = denoiser_train.make_target_fn(model, name, caf_kind=caf_kind)(variables, x_natural,
                                                                        labels)
  computed, computed_metrics = step(fresh(), variables, x_adv, x_natural, labels)
  given, given_metrics = step(fresh(), variables, x_adv, x_natural, labels, None, target)
  np.testing.assert_allclose(given_metrics["loss"], computed_metrics["loss"], rtol=1e-5)
  for got, want in zip(jax.tree.leaves(given), jax.tree.leaves(computed)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  _, wrong_metrics = step(fresh(), variables, x_adv, x_natural, labels, None, target + 1.0)
  assert abs(float(wrong_metrics["loss"]) - float(computed_metrics["loss"])) > 1e-3


def test_only_hgd_and_caf_losses_have_a_natural_target(trained_tiny):
  model = trained_tiny[0]
  assert denoiser_train.make_target_fn(model, "pixel") is None
  assert denoiser_train.make_target_fn(model, "a_users_own_loss") is None
  assert denoiser_train.make_target_fn(model, "hgd") is not None
  assert denoiser_train.make_target_fn(model, "cafd", caf_kind="features") is not None


def test_progress_rate_counts_from_the_first_step_not_from_compilation(capsys):
  from cafd_jax import metrics  # pylint: disable=g-import-not-at-top
  logger = metrics.ProgressLogger("s", total_steps=6, workdir=None, batch_size=10, every_steps=3)
  for step in range(1, 7):
    logger.step(step, {"loss": jnp.float32(1.0)})
  lines = capsys.readouterr().out.splitlines()
  assert [line.split()[2] for line in lines] == ["3/6", "6/6"]
  assert all("ETA ?" not in line and " 0 img/s" not in line for line in lines), lines
  one_step = metrics.ProgressLogger("s", total_steps=2, workdir=None, batch_size=10,
                                    every_steps=1)
  one_step.step(1, {"loss": jnp.float32(1.0)})  # logged at once: no rate yet
  assert "ETA ?" in capsys.readouterr().out
