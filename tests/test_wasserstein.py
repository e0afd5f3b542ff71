"""Wasserstein PGD: the projected-Sinkhorn projection (ball, mass) and the attack."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from cafd_jax import data
from cafd_jax.attacks import wasserstein
from conftest import assert_in_box

# The attack tests: few PGD steps and Sinkhorn iterations (on CIFAR-10 images, 20 iterations
# keep the plan cost within 0.4% of eps, 50 within 0.01%); the radius may grow every 2 steps.
ATTACK_STATIC = dict(steps=6, sinkhorn_iters=20, eps_growth_every=2)


def _local_lp_distance(x: np.ndarray, z: np.ndarray, kernel_size: int = 5, p: float = 2) -> float:
  """Exact local transport cost between two [H, W] mass maps (z rescaled to x's mass)."""
  x = x.astype(np.float64)
  z = z.astype(np.float64) * x.sum() / z.sum()
  height, width = x.shape
  radius = kernel_size // 2
  sources, targets, costs = [], [], []
  for i in range(height * width):
    for j in range(height * width):
      dy, dx = abs(i // width - j // width), abs(i % width - j % width)
      if dy <= radius and dx <= radius:
        sources.append(i)
        targets.append(j)
        costs.append((dy * dy + dx * dx) ** (p / 2))
  n = height * width
  constraints = np.zeros((2 * n, len(costs)))
  constraints[sources, np.arange(len(costs))] = 1.0
  constraints[n + np.asarray(targets), np.arange(len(costs))] = 1.0
  result = optimize.linprog(costs, A_eq=constraints, b_eq=np.concatenate([x.ravel(), z.ravel()]),
                            bounds=(0, None), method="highs")
  assert result.status == 0, result.message
  return float(result.fun)


@functools.lru_cache(maxsize=None)
def _jitted_projection(**static):
  return jax.jit(functools.partial(wasserstein.projected_sinkhorn, return_cost=True, **static))


def _project(x, w, eps, **static):
  return _jitted_projection(**static)(x, w, jnp.asarray(eps, jnp.float32))


@pytest.fixture(scope="module")
def images():
  """Four synthetic 32x32x3 images as mass distributions, and attack-like points to project."""
  x = jnp.asarray(data.make_synthetic(4, seed=3).images)
  mass = jnp.sum(x, axis=(1, 2, 3), keepdims=True)
  signs = jnp.asarray(np.sign(np.random.default_rng(0).normal(size=x.shape)), jnp.float32)
  return x / mass, (x + 0.1 * signs) / mass


def test_local_cost_is_the_squared_pixel_distance():
  np.testing.assert_array_equal(wasserstein.local_cost(3, 2), [[2, 1, 2], [1, 0, 1], [2, 1, 2]])
  np.testing.assert_allclose(wasserstein.local_cost(5, 1)[0, 0], np.sqrt(8.0), rtol=1e-6)
  with pytest.raises(ValueError, match="odd"):
    wasserstein.local_cost(4)


def test_projection_lies_in_the_ball_by_the_exact_transport_lp():
  """Tiny single-channel images: the LP distance of the projection is at most eps.

  Per-pixel masses of a 4x4 image are 192 times those of a 32x32x3 one, so lambda is scaled
  down by that factor (3000 / 192 ~ 16) to keep the problem's balance.
  """
  rng = np.random.default_rng(0)
  x = rng.uniform(0.2, 1.0, (3, 4, 4, 1)).astype(np.float32)
  centre = x / x.sum(axis=(1, 2, 3), keepdims=True)
  w = np.abs(centre + 0.03 * rng.standard_normal(centre.shape)).astype(np.float32)
  for eps in (0.01, 0.05):
    z, plan_cost = _project(jnp.asarray(centre), jnp.asarray(w), eps, regularization=16.0,
                            iters=200)
    z = np.asarray(z)
    assert z.min() >= 0.0
    np.testing.assert_allclose(plan_cost, eps, rtol=1e-3)  # the constraint is active
    for b in range(3):
      before = _local_lp_distance(centre[b, ..., 0], w[b, ..., 0])
      after = _local_lp_distance(centre[b, ..., 0], z[b, ..., 0])
      assert before > 2 * eps  # w was outside the ball ...
      assert after <= eps + 1e-5, (eps, b, after)  # ... its projection is inside


def test_projection_reaches_the_ball_and_keeps_channel_mass(images):
  centre, w = images
  radii = jnp.asarray([0.002, 0.01, 0.05, 0.2])  # one per example
  z, plan_cost = _project(centre, w, radii, iters=50)
  assert np.all(np.asarray(z) >= 0.0)
  np.testing.assert_allclose(plan_cost, radii, rtol=1e-4)  # the constraint is active
  np.testing.assert_allclose(jnp.sum(z, axis=(1, 2)), jnp.sum(centre, axis=(1, 2)), rtol=1e-4)


def test_projecting_a_point_inside_the_ball_changes_it_little(images):
  """Moving at most eps of the mass by >= 1 pixel changes the image by at most 2 eps in L1."""
  centre, w = images
  radii = jnp.full((4,), 0.01)
  z, plan_cost = _project(centre, centre, radii, iters=50)
  assert np.all(np.asarray(plan_cost) <= radii * 1.0001)
  moved = np.asarray(jnp.sum(jnp.abs(z - centre), axis=(1, 2, 3)))
  assert np.all(moved <= 2 * radii * 1.0001), moved
  # A point outside the ball moves far more.
  z_out, _ = _project(centre, w, radii, iters=50)
  assert np.all(np.asarray(jnp.sum(jnp.abs(z_out - w), axis=(1, 2, 3))) > 10 * moved)


def test_projection_of_a_black_image_is_finite_and_leaves_the_others_alone(images):
  x, w = images
  # The attack's w for an all-black image is (0 +- alpha) / its clamped mass 1e-12.
  black_w = 0.1 * jnp.sign(w[0]) / 1e-12
  z, cost = _project(x.at[0].set(0.0), w.at[0].set(black_w), 0.01, iters=20)
  z_alone, cost_alone = _project(x[1:], w[1:], 0.01, iters=20)
  assert np.all(np.isfinite(np.asarray(z))) and np.all(np.isfinite(np.asarray(cost)))
  assert float(cost[0]) == 0.0 and float(jnp.max(jnp.abs(z[0]))) < 1e-6  # no mass to move
  np.testing.assert_allclose(z[1:], z_alone, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(cost[1:], cost_alone, rtol=1e-5)


@functools.lru_cache(maxsize=None)
def _jitted_attack(apply_fn, **static):
  def run(params, x, y, key, eps, growth, max_eps):
    return wasserstein.wasserstein(functools.partial(apply_fn, params), x, y, key, eps=eps,
                                   eps_growth=growth, max_eps=max_eps, **static)
  return jax.jit(run)


def _attack(model, x, y, eps, growth=1.0, max_eps=np.inf, key=0, **static):
  apply_fn, params = model
  static = {**ATTACK_STATIC, **static}
  return _jitted_attack(apply_fn, **static)(params, x, y, jax.random.key(key), jnp.float32(eps),
                                            jnp.float32(growth), jnp.float32(max_eps))


@pytest.fixture(scope="module")
def tiny(trained_tiny):
  """((apply_fn, variables), x, y, correct) on 16 test images."""
  model, variables, test_set, _ = trained_tiny
  x, y = jnp.asarray(test_set.images[:16]), jnp.asarray(test_set.labels[:16])
  model = (model.apply, variables)
  return model, x, y, _correct(model, x, y)


def _linear_apply(weights, x):
  return x.reshape(x.shape[0], -1) @ weights


@pytest.fixture(scope="module")
def linear():
  """A linear model (cheap to compile) on eight random 16x16x3 images."""
  rng = np.random.default_rng(1)
  weights = jnp.asarray(rng.normal(0.0, 0.1, (16 * 16 * 3, 10)), jnp.float32)
  x = jnp.asarray(rng.uniform(0.0, 1.0, (8, 16, 16, 3)), jnp.float32)
  y = jnp.asarray(np.argmax(np.asarray(x).reshape(8, -1) @ np.asarray(weights), -1))  # all correct
  return (_linear_apply, weights), x, y


def _correct(model, x, y):
  apply_fn, params = model
  return np.asarray(jnp.argmax(apply_fn(params, x), -1) == y)


def test_attack_fools_the_trained_model_within_the_box(tiny):
  model, x, y, clean = tiny
  x_adv = _attack(model, x, y, 0.05)
  assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
  assert_in_box(x_adv)
  adv = _correct(model, x_adv, y)
  assert clean.mean() >= 0.5
  assert adv.mean() <= 0.25 * clean.mean(), (adv.mean(), clean.mean())
  np.testing.assert_array_equal(x_adv[~clean], x[~clean])  # already misclassified: kept


def test_attack_keeps_the_first_adversarial_iterate_and_is_deterministic(linear):
  model, x, y = linear
  early = _attack(model, x, y, 0.01, steps=2)
  late = _attack(model, x, y, 0.01)
  fooled_early = ~_correct(model, early, y)
  assert 0 < fooled_early.sum() < len(y)
  np.testing.assert_array_equal(late[fooled_early], early[fooled_early])
  assert np.any(np.asarray(late != early)[~fooled_early])
  assert_in_box(late)
  np.testing.assert_array_equal(late, _attack(model, x, y, 0.01, key=7))  # key is unused


def test_eps_schedule_grows_until_capped(linear):
  model, x, y = linear
  fixed = _attack(model, x, y, 0.003)
  grown = _attack(model, x, y, 0.003, growth=3.0)  # 0.003 -> 0.009 -> 0.027 at steps 2, 4
  capped = _attack(model, x, y, 0.003, growth=3.0, max_eps=0.003)
  np.testing.assert_array_equal(capped, fixed)
  assert _correct(model, grown, y).sum() < _correct(model, fixed, y).sum()


def test_attack_handles_black_and_white_images(linear):
  model, x, y = linear
  x = x.at[0].set(0.0).at[1].set(1.0)
  x_adv = np.asarray(_attack(model, x, y, 0.01))
  assert np.all(np.isfinite(x_adv)) and x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  np.testing.assert_array_equal(x_adv[0], 0.0)  # no mass to move


def test_zero_steps_return_the_input(linear):
  model, x, y = linear
  np.testing.assert_array_equal(_attack(model, x, y, 0.05, steps=0), x)
