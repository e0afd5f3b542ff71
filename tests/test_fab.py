"""FAB: the L-inf projection against an LP, closed-form distances, and FAB-T on a tiny model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from cafd_jax.attacks import fab
from conftest import assert_in_box


def _linf(delta):
  return np.abs(np.asarray(delta)).reshape(delta.shape[0], -1).max(axis=1)


def _lp_projection_norm(t, w, b):
  """min ||d||_inf s.t. w.(t + d) = b, 0 <= t + d <= 1, by linprog; None if infeasible."""
  dim = t.shape[0]
  cost = np.r_[np.zeros(dim), 1.0]  # variables (d, s), minimise s
  bound_s = np.c_[np.r_[np.eye(dim), -np.eye(dim)], -np.ones(2 * dim)]  # |d_i| <= s
  result = optimize.linprog(cost, A_ub=bound_s, b_ub=np.zeros(2 * dim),
                            A_eq=np.r_[w, 0.0][None], b_eq=[b - w @ t],
                            bounds=[(-ti, 1.0 - ti) for ti in t] + [(0.0, None)],
                            method="highs")
  return result.fun if result.status == 0 else None


def _random_hyperplanes(seed, rows=48, dim=50):
  """Rows of (t, w, b); row i uses only its first 10, 25 or 50 coordinates (w = 0 after)."""
  rng = np.random.default_rng(seed)
  t = rng.uniform(size=(rows, dim))
  w = rng.normal(size=(rows, dim)) * (rng.uniform(size=(rows, dim)) < 0.8)  # some w_i = 0
  w *= np.arange(dim)[None] < np.array([10, 25, 50])[np.arange(rows) % 3][:, None]
  spread = np.where(np.arange(rows) % 4 == 0, 0.003, 0.4)  # some with every |d_i| equal
  b = np.sum(w * t, 1) + rng.normal(size=rows) * np.abs(w).sum(1) * spread
  return t.astype(np.float32), w.astype(np.float32), b.astype(np.float32)


_projection = jax.jit(fab.projection_linf)  # one compilation for both projection tests


def test_projection_is_the_minimal_linf_point_on_the_hyperplane_in_the_box():
  t, w, b = _random_hyperplanes(0)
  d = np.asarray(_projection(jnp.asarray(t), jnp.asarray(w), jnp.asarray(b)))
  feasible = uniform = 0
  for i in range(len(t)):
    optimum = _lp_projection_norm(t[i].astype(np.float64), w[i].astype(np.float64), float(b[i]))
    projected = t[i] + d[i]
    assert projected.min() >= -1e-6 and projected.max() <= 1.0 + 1e-6
    assert np.all(d[i][w[i] == 0] == 0)
    if optimum is not None:
      feasible += 1
      assert abs(w[i] @ projected - b[i]) <= 1e-5 * (1.0 + np.abs(w[i]).sum())
      assert np.abs(d[i]).max() == pytest.approx(optimum, abs=1e-5)
      toward = np.sign(b[i] - w[i] @ t[i]) * np.sign(w[i])  # the side each coordinate moves
      room = np.where(toward > 0, 1.0 - t[i], t[i])[w[i] != 0]
      uniform += optimum < room.min()  # no coordinate reaches the box
    else:  # the reference moves to the box corner closest to the hyperplane
      sign = 1.0 if w[i] @ t[i] >= b[i] else -1.0
      corner = np.where(sign * w[i] < 0, 1.0, 0.0)
      np.testing.assert_allclose(projected[w[i] != 0], corner[w[i] != 0], atol=1e-6)
  assert 0 < len(t) - feasible and 0 < uniform < feasible // 2  # every case exercised


def test_projection_matches_torchattacks():
  torch = pytest.importorskip("torch")
  reference = pytest.importorskip("torchattacks.attacks.fab").projection_linf
  t, w, b = _random_hyperplanes(1)
  expected = reference(torch.tensor(t), torch.tensor(w), torch.tensor(b)).numpy()
  np.testing.assert_allclose(_projection(jnp.asarray(t), jnp.asarray(w), jnp.asarray(b)),
                             expected, atol=1e-5)


# A 2-class linear model: logits (0, v.(x - 0.5)); the test points are class 0.
_V = np.random.default_rng(3).normal(size=(6, 6, 3)).astype(np.float32)
_DIST = np.array([0.02, 0.05, 0.1, 0.15], np.float32)  # from the boundary, in L-inf


def _linear_two_class(x):
  return jnp.stack([jnp.zeros(x.shape[0]), jnp.sum((x - 0.5) * _V, axis=(1, 2, 3))], axis=1)


def _linear_points():
  """Points at L-inf distance _DIST from the boundary, far enough from the box faces."""
  x = np.random.default_rng(4).uniform(0.45, 0.55, size=(4, 6, 6, 3))
  margin = np.sum((x - 0.5) * _V, axis=(1, 2, 3)) / np.abs(_V).sum()
  x = x - (margin + _DIST)[:, None, None, None] * np.sign(_V)  # now v.(x - 0.5) = -DIST ||v||_1
  assert 0.2 < x.min() and x.max() < 0.8
  return _linear_two_class, jnp.asarray(x, jnp.float32), jnp.zeros(4, jnp.int32)


@jax.jit
def _linear_attacks(x, y, eta):
  """FAB-T once, FAB, and FAB-T within eps = 0.12 on the linear model; eta traced."""
  params = dict(steps=30, eta=eta)
  key = jax.random.key(0)
  return (fab.fab_targeted_once(_linear_two_class, x, y, 1 - y, key, **params),
          fab.fab(_linear_two_class, x, y, key, eps=1.0, **params),
          fab.fab_targeted(_linear_two_class, x, y, key, eps=0.12, n_target_classes=1,
                           **params))


@pytest.mark.parametrize("eta,tolerance", [(1.05, 1e-2), (1.001, 1e-3)])
def test_minimal_distance_to_a_linear_boundary(eta, tolerance):
  logits_fn, x, y = _linear_points()
  x_adv, untargeted, within = _linear_attacks(x, y, jnp.float32(eta))
  assert np.all(np.argmax(logits_fn(x_adv), -1) == 1)
  distance = _linf(x_adv - x)
  assert np.all(distance >= _DIST * (1.0 - 1e-4))  # nothing beats the exact minimum
  np.testing.assert_array_less(distance, _DIST * (1.0 + tolerance))
  np.testing.assert_allclose(_linf(untargeted - x), distance, rtol=1e-4)
  np.testing.assert_array_equal(_linf(within - x) > 0, _DIST < 0.12)
  assert _linf(within - x).max() <= 0.12


def test_too_many_target_classes_is_an_error():
  logits_fn, x, y = _linear_points()
  with pytest.raises(ValueError, match="n_target_classes"):
    fab.fab_targeted(logits_fn, x, y, jax.random.key(0), steps=1, n_target_classes=2)


@pytest.fixture(scope="module")
def tiny(trained_tiny):
  """(apply_fn, variables, x, y) on 16 test images."""
  model, variables, test_set, _ = trained_tiny
  return (model.apply, variables, jnp.asarray(test_set.images[:16]),
          jnp.asarray(test_set.labels[:16]))


@functools.lru_cache(maxsize=None)
def _jitted_fab_t(apply_fn):
  """Few steps, two restarts (so the key matters), two targets; eps stays traced."""
  def run(variables, x, y, key, eps):
    logits_fn = functools.partial(apply_fn, variables)
    return fab.fab_targeted(logits_fn, x, y, key, eps=eps, steps=5, restarts=2,
                            n_target_classes=2)
  return jax.jit(run)


def _predict(apply_fn, variables, x):
  return np.asarray(jnp.argmax(apply_fn(variables, x), -1))


def test_fab_t_stays_in_ball_and_box_is_deterministic_and_grows_with_eps(tiny):
  apply_fn, variables, x, y = tiny
  x, y = x[:8], y[:8]
  attack = _jitted_fab_t(apply_fn)
  errors = []
  for eps in (0.0, 1 / 255, 4 / 255, 8 / 255):
    x_adv = attack(variables, x, y, jax.random.key(1), jnp.float32(eps))
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert_in_box(x_adv)
    assert _linf(x_adv - x).max() <= eps + 1e-6
    if eps == 0.0:
      np.testing.assert_array_equal(x_adv, x)
    errors.append(float(np.mean(_predict(apply_fn, variables, x_adv) != np.asarray(y))))
  np.testing.assert_array_equal(x_adv, attack(variables, x, y, jax.random.key(1),
                                               jnp.float32(8 / 255)))
  assert errors == sorted(errors), errors
  assert errors[-1] >= errors[0] + 0.5, errors


def test_targeted_runs_reach_their_targets(tiny):
  apply_fn, variables, x, y = tiny
  target = (y + 1 + jnp.arange(len(y)) % 9) % 10

  @jax.jit
  def attack(variables, x, y, target, key):
    logits_fn = functools.partial(apply_fn, variables)
    return fab.fab_targeted_once(logits_fn, x, y, target, key, steps=20, eps=1.0)

  x_adv = attack(variables, x, y, target, jax.random.key(0))
  correct = _predict(apply_fn, variables, x) == np.asarray(y)
  hit = _predict(apply_fn, variables, x_adv) == np.asarray(target)
  assert correct.sum() >= 8
  assert hit[correct].mean() >= 0.75, hit
  assert_in_box(x_adv)
  assert np.all(_linf(x_adv - x)[correct] < 0.5)  # minimal-norm: far below the box diameter


class _TinyMlp:
  """A 2-layer tanh MLP on 6x6x3 images, for JAX and (NCHW) torch."""

  def __init__(self, seed=0, hidden=64, classes=10):
    rng = np.random.default_rng(seed)
    dim = 6 * 6 * 3
    self.w1 = (rng.normal(size=(dim, hidden)) * 4 / np.sqrt(dim)).astype(np.float32)
    self.w2 = (rng.normal(size=(hidden, classes)) / 2).astype(np.float32)

  def jax_logits(self, x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ self.w1 - 1.0) @ self.w2

  def torch_module(self, torch):
    w1, w2 = torch.tensor(self.w1), torch.tensor(self.w2)

    class Module(torch.nn.Module):

      def forward(self, x):
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        return torch.tanh(x @ w1 - 1.0) @ w2

    return Module()


@pytest.mark.slow
def test_fab_t_and_fab_match_torchattacks_example_by_example():
  """Deterministic (one restart): the same examples are fooled as by torchattacks' FAB."""
  torch = pytest.importorskip("torch")
  torchattacks = pytest.importorskip("torchattacks")
  mlp = _TinyMlp()
  x = np.random.default_rng(1).uniform(size=(100, 6, 6, 3)).astype(np.float32)
  y = np.array(jnp.argmax(mlp.jax_logits(jnp.asarray(x)), -1))
  y[:5] = (y[:5] + 1) % 10  # a few misclassified inputs, left alone by both
  x_nchw = torch.tensor(x).permute(0, 3, 1, 2).contiguous()
  predict = lambda z: np.asarray(jnp.argmax(mlp.jax_logits(jnp.asarray(z)), -1))
  eps, steps = 0.03, 30
  for multi_targeted, ours in [(True, fab.fab_targeted), (False, fab.fab)]:
    reference = torchattacks.FAB(mlp.torch_module(torch), eps=eps, steps=steps,
                                 multi_targeted=multi_targeted, n_classes=10)
    theirs = reference(x_nchw, torch.tensor(y)).permute(0, 2, 3, 1).numpy()
    x_adv = jax.jit(functools.partial(ours, mlp.jax_logits, eps=eps, steps=steps))(
        jnp.asarray(x), jnp.asarray(y), jax.random.key(0))
    robust_theirs, robust_ours = predict(theirs) == y, predict(x_adv) == y
    assert 0.05 <= robust_theirs.mean() <= 0.5, robust_theirs.mean()  # a telling budget
    assert np.sum(robust_theirs != robust_ours) <= 2, (robust_theirs.mean(), robust_ours.mean())
    assert _linf(x_adv - x).max() <= eps + 1e-6
