"""PGD and the CAF attack: constraints, determinism, and that they actually hurt a trained model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafd_jax import attacks
from cafd_jax.train import denoiser as denoiser_train
from conftest import assert_in_box


def _linear_logits(x):
  weights = jnp.linspace(-1.0, 1.0, x[0].size * 10).reshape(x[0].size, 10)
  return x.reshape(x.shape[0], -1) @ weights


@pytest.fixture()
def batch():
  x = jax.random.uniform(jax.random.key(0), (6, 32, 32, 3))
  x = x.at[0].set(0.0).at[1].set(1.0)  # pixels at the box edges
  return x, jnp.arange(6) % 10


@pytest.mark.parametrize("eps", [0.0, 2 / 255, 8 / 255])
def test_pgd_respects_ball_and_box(batch, eps):
  x, y = batch
  x_adv = attacks.pgd(_linear_logits, x, y, jax.random.key(1), eps=eps, step_size=0.01, steps=5)
  assert float(jnp.max(jnp.abs(x_adv - x))) <= eps + 1e-6
  assert_in_box(x_adv)
  if eps == 0.0:
    np.testing.assert_array_equal(x_adv, x)


def test_pgd_is_deterministic_for_a_key_and_varies_across_keys(batch):
  x, y = batch
  run = lambda seed: attacks.pgd(_linear_logits, x, y, jax.random.key(seed), steps=3)
  np.testing.assert_array_equal(run(3), run(3))
  assert not np.array_equal(run(3), run(4))


def test_projected_gradient_ascent_increases_the_objective(batch):
  x, _ = batch
  objective = lambda z: jnp.sum(z.reshape(z.shape[0], -1), axis=1)
  x_adv = attacks.projected_gradient_ascent(objective, x, jax.random.key(0), eps=0.1,
                                            step_size=0.05, steps=3, random_start=False)
  # The maximiser of a sum of pixels is the upper corner of the box-clipped ball.
  np.testing.assert_allclose(x_adv, jnp.clip(x + 0.1, 0, 1), atol=1e-6)


def test_caf_attack_respects_constraints(trained_tiny):
  model, variables, test_set, _ = trained_tiny
  caf_fn = denoiser_train.classifier_caf_fn(model, variables, "weighted_features", "prediction")
  x, y = jnp.asarray(test_set.images[:8]), jnp.asarray(test_set.labels[:8])
  for eps in (0.0, 8 / 255):
    x_adv = attacks.caf_attack(caf_fn, x, y, jax.random.key(0), eps=eps, step_size=0.01, steps=3)
    assert float(jnp.max(jnp.abs(x_adv - x))) <= eps + 1e-6
    assert_in_box(x_adv)
  np.testing.assert_array_equal(
      attacks.caf_attack(caf_fn, x, y, jax.random.key(0), eps=0.0, steps=3), x)


def test_attacks_lower_accuracy_of_a_trained_model(trained_tiny):
  model, variables, test_set, clean_accuracy = trained_tiny
  assert clean_accuracy >= 0.6, "the fixture model did not train"
  x, y = jnp.asarray(test_set.images), jnp.asarray(test_set.labels)
  logits_fn = lambda images: model.apply(variables, images)
  accuracy = lambda images: float(jnp.mean(jnp.argmax(logits_fn(images), -1) == y))
  x_pgd = jax.jit(lambda x, y, k: attacks.pgd(logits_fn, x, y, k, steps=10))(x, y, jax.random.key(0))
  assert accuracy(x_pgd) <= 0.3 * clean_accuracy
  caf_fn = denoiser_train.classifier_caf_fn(model, variables, "weighted_features", "prediction")
  x_caf = jax.jit(lambda x, y, k: attacks.caf_attack(caf_fn, x, y, k, steps=10))(
      x, y, jax.random.key(0))
  natural_caf, adversarial_caf = caf_fn(x, y), caf_fn(x_caf, y)
  random_caf = caf_fn(jnp.clip(x + 8 / 255 * jnp.sign(jax.random.normal(jax.random.key(1), x.shape)),
                               0, 1), y)
  # The CAF attack moves class activation features far more than random noise of equal size,
  # and it costs accuracy even though it never looks at the labels' logits.
  assert float(jnp.mean((adversarial_caf - natural_caf) ** 2)) > 3 * float(
      jnp.mean((random_caf - natural_caf) ** 2))
  assert accuracy(x_caf) < clean_accuracy - 0.2
