"""stAdv: the bilinear warp, the flow loss, and the attack on a trained tiny model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

import conftest
from cafd_jax.attacks import spatial


@functools.lru_cache(maxsize=None)
def _jitted(fn, apply_fn, **static):
  """One compiled attack per (fn, apply_fn, static params); the floats stay traced."""

  def run(params, x, y, key, floats):
    return fn(functools.partial(apply_fn, params), x, y, key, **floats, **static)

  return jax.jit(run)


def _attack(fn, model, x, y, key=jax.random.key(0), max_flow=None, lr=None, **static):
  """Runs fn (spatial_transform or spatial_transform_flow) jitted; max_flow, lr traced."""
  apply_fn, params = model
  floats = {name: jnp.float32(value) for name, value in (("max_flow", max_flow), ("lr", lr))
            if value is not None}
  return _jitted(fn, apply_fn, **static)(params, x, y, key, floats)


_flow = functools.partial(_attack, spatial.spatial_transform_flow)


_correct = conftest.correct_predictions


def _lengths(flow):
  return np.sqrt(np.sum(np.square(np.asarray(flow)), axis=-1))


@pytest.fixture(scope="module")
def tiny(trained_tiny):
  """((apply_fn, variables), x, y) on 16 test images."""
  model, variables, test_set, _ = trained_tiny
  return ((model.apply, variables), jnp.asarray(test_set.images[:16]),
          jnp.asarray(test_set.labels[:16]))


def _random_images(seed, shape=(2, 9, 11, 3)):
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def test_warp_with_zero_flow_is_the_identity():
  x = _random_images(0)
  out = spatial.warp(jnp.asarray(x), jnp.zeros(x.shape[:3] + (2,)))
  np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("shift", [(0, 1), (1, 0), (-2, 3)])
def test_warp_with_an_integer_flow_shifts_the_image(shift):
  x = _random_images(1)
  flow = np.broadcast_to(np.asarray(shift, np.float32), x.shape[:3] + (2,))
  out = np.asarray(spatial.warp(jnp.asarray(x), jnp.asarray(flow)))
  # x_adv[i, j] = x[i + dr, j + dc]: np.roll by the negated shift, exact where no wrap-around.
  rolled = np.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
  dr, dc = shift
  rows = slice(max(0, -dr), x.shape[1] - max(0, dr))
  cols = slice(max(0, -dc), x.shape[2] - max(0, dc))
  np.testing.assert_allclose(out[:, rows, cols], rolled[:, rows, cols], atol=1e-6)
  # Beyond the border the nearest border pixel is repeated.
  if dc > 0:
    np.testing.assert_allclose(out[:, rows, -1], x[:, rows.start + dr:rows.stop + dr, -1],
                               atol=1e-6)


def test_warp_matches_scipy_map_coordinates():
  x = _random_images(2)
  flow = np.random.default_rng(3).normal(scale=3.0, size=x.shape[:3] + (2,)).astype(np.float32)
  out = np.asarray(spatial.warp(jnp.asarray(x), jnp.asarray(flow)))
  rows, cols = np.meshgrid(np.arange(x.shape[1]), np.arange(x.shape[2]), indexing="ij")
  expected = np.empty_like(x)
  for b in range(x.shape[0]):
    coords = [rows + flow[b, ..., 0], cols + flow[b, ..., 1]]
    for c in range(x.shape[3]):
      expected[b, ..., c] = ndimage.map_coordinates(x[b, ..., c], coords, order=1,
                                                    mode="nearest")
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_warp_gradient_matches_finite_differences():
  x = jnp.asarray(_random_images(4, (1, 5, 6, 2)))
  flow = jnp.asarray(np.random.default_rng(5).uniform(-2, 2, (1, 5, 6, 2)).astype(np.float32))
  direction = jnp.asarray(np.random.default_rng(6).normal(size=flow.shape).astype(np.float32))
  loss = lambda f: jnp.sum(jnp.sin(3.0 * spatial.warp(x, f)))
  analytic = float(jnp.sum(jax.grad(loss)(flow) * direction))
  h = 1e-3
  numeric = (float(loss(flow + h * direction)) - float(loss(flow - h * direction))) / (2 * h)
  assert analytic == pytest.approx(numeric, rel=2e-2, abs=2e-2)


def test_flow_loss_matches_numpy():
  flow = np.random.default_rng(7).normal(size=(2, 4, 5, 2))
  eps = 1e-8
  expected = np.zeros(2)
  for b in range(2):
    for i in range(4):
      for j in range(5):
        for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
          if 0 <= i + di < 4 and 0 <= j + dj < 5:
            diff = flow[b, i, j] - flow[b, i + di, j + dj]
            expected[b] += np.sqrt(np.sum(diff**2) + eps)
  np.testing.assert_allclose(spatial.flow_loss(jnp.asarray(flow, jnp.float32)), expected,
                             rtol=1e-5)
  # A constant flow (a translation) costs only the eps terms.
  constant = jnp.ones((1, 4, 5, 2))
  pairs = 2 * (3 * 5 + 4 * 4)
  np.testing.assert_allclose(spatial.flow_loss(constant), [pairs * np.sqrt(eps)], rtol=1e-4)


def test_advertorch_flow_loss_matches_numpy():
  flow = np.random.default_rng(8).normal(size=(2, 4, 5, 2))
  grid = flow * np.array([2 / 4, 2 / 5])  # [-1, 1] grid units: rows by 2/H, columns by 2/W
  vertical = np.sqrt(np.sum((grid[:, 1:] - grid[:, :-1])**2, axis=(1, 2, 3)))
  horizontal = np.sqrt(np.sum((grid[:, :, 1:] - grid[:, :, :-1])**2, axis=(1, 2, 3)))
  np.testing.assert_allclose(spatial.flow_l2_loss(jnp.asarray(flow, jnp.float32), eps=0.0),
                             vertical + horizontal, rtol=1e-5)


def test_lbfgs_two_loop_satisfies_the_secant_equation():
  rng = np.random.default_rng(9)
  s_mem = rng.normal(size=(3, 2, 4, 4, 2)).astype(np.float32)
  y_mem = (s_mem + 0.3 * rng.normal(size=s_mem.shape)).astype(np.float32)
  sy = np.sum(s_mem * y_mem, axis=(2, 3, 4))
  assert np.all(sy > 0)
  rho = (1.0 / sy).astype(np.float32)
  rho[0, 1] = 0.0  # an empty slot changes nothing below
  gamma = np.float32([0.5, 2.0])
  # The inverse-Hessian estimate maps the newest gradient difference to the newest step.
  r = spatial._two_loop(jnp.asarray(y_mem[-1]), jnp.asarray(s_mem), jnp.asarray(y_mem),
                        jnp.asarray(rho), jnp.asarray(gamma))
  np.testing.assert_allclose(r, s_mem[-1], rtol=1e-4, atol=1e-4)
  # With no memory it is gamma times the gradient.
  r = spatial._two_loop(jnp.asarray(y_mem[0]), jnp.asarray(s_mem), jnp.asarray(y_mem),
                        jnp.zeros_like(jnp.asarray(rho)), jnp.asarray(gamma))
  np.testing.assert_allclose(r, gamma[:, None, None, None] * y_mem[0], rtol=1e-6)


def test_attack_fools_the_trained_model_with_small_smooth_flows(tiny):
  model, x, y = tiny
  flow = _flow(model, x, y)  # defaults: L-BFGS, advertorch smoothness, tau = 1, 100 steps
  warped = spatial.warp(x, flow)
  # Bilinear warps mix pixels convexly, so the clipping in spatial_transform is only rounding.
  conftest.assert_in_box(warped, atol=1e-6)
  x_adv = jnp.clip(warped, 0.0, 1.0)  # what spatial_transform returns
  clean_correct = _correct(model, x, y)
  adv_correct = _correct(model, x_adv, y)
  assert adv_correct.mean() <= 0.25 * clean_correct.mean(), adv_correct.mean()  # measured 0
  lengths = _lengths(flow)[~adv_correct]
  # The smallest fooling flows are kept: measured mean 0.02 px, max 1.1 px per pixel.
  assert lengths.mean() < 0.1 and lengths.max() < 3.0, (lengths.mean(), lengths.max())


ADAM = dict(optimizer="adam", steps=30)


def test_adam_variant_also_fools_the_model(tiny):
  model, x, y = tiny
  x_adv = spatial.warp(x, _flow(model, x, y, lr=0.05, **ADAM))
  assert _correct(model, x_adv, y).mean() <= 0.25 * _correct(model, x, y).mean()


@pytest.mark.slow
def test_paper_smoothness_variant_lowers_accuracy(tiny):
  model, x, y = tiny
  flow = _flow(model, x, y, smoothness="paper")
  # The paper's total-variation penalty with tau = 0.05 is far stronger than advertorch's on
  # this small-logit model: measured accuracy 0.75 -> 0.5, flows at most 0.41 px.
  assert _correct(model, spatial.warp(x, flow), y).mean() <= _correct(model, x, y).mean() - 0.15
  assert _lengths(flow).max() < 1.0


def test_zero_steps_or_zero_learning_rate_returns_the_inputs(tiny):
  model, x, y = tiny
  x_adv = _attack(spatial.spatial_transform, model, x, y, steps=0)
  assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
  np.testing.assert_array_equal(x_adv, x)
  np.testing.assert_array_equal(_flow(model, x, y, lr=0.0, **ADAM), 0.0)


LBFGS_SHORT = dict(steps=20)


@pytest.mark.parametrize("static", [LBFGS_SHORT, ADAM], ids=["lbfgs", "adam"])
def test_max_flow_bounds_every_displacement(tiny, static):
  model, x, y = tiny
  lr = 0.1 if static is ADAM else None
  flow = _flow(model, x, y, max_flow=0.3, lr=lr, **static)
  lengths = _lengths(flow)
  assert lengths.max() <= 0.3 + 1e-5
  assert lengths.max() >= 0.1  # the bound is active, not a trivially zero flow
  np.testing.assert_array_equal(_flow(model, x, y, max_flow=0.0, lr=lr, **static), 0.0)
  if static is LBFGS_SHORT:  # deterministic, and the key is unused
    np.testing.assert_array_equal(
        flow, _flow(model, x, y, key=jax.random.key(5), max_flow=0.3, lr=lr, **static))


def test_unknown_names_are_rejected(tiny):
  model, x, y = tiny
  logits_fn = functools.partial(model[0], model[1])
  with pytest.raises(ValueError, match="known: 'adam', 'lbfgs'"):
    spatial.spatial_transform_flow(logits_fn, x, y, jax.random.key(0), optimizer="sgd")
  with pytest.raises(ValueError, match="known: 'advertorch', 'paper'"):
    spatial.spatial_transform_flow(logits_fn, x, y, jax.random.key(0), smoothness="tv")
