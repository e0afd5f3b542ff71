"""The attack registry: constraints, determinism, and strength on a trained tiny model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from cafd_jax.attacks import pgd_suite, registry

# Few steps keep compiling and running fast; budgets are passed traced. The PGDs use
# restarts and the CW loss here, so the constraint tests cover them; "ce" is the default.
FAST_PARAMS = {
    "fgsm": {},
    "pgd": dict(steps=3, restarts=2, loss="cw"),
    "pgd_l2": dict(steps=3, restarts=3, loss="cw"),
    "mifgsm": dict(steps=3),
    "cw": dict(steps=5, binary_search_steps=2),
    "ddn": dict(steps=5),
    "apgd_ce": dict(steps=5, restarts=2),
    "apgd_dlr": dict(steps=5),
    "apgd_t": dict(steps=3, n_target_classes=2),
    "fab_t": dict(steps=3, n_target_classes=2),
    "square": dict(n_queries=20),
    "autoattack": dict(steps=3, n_target_classes=2, square_queries=20),
    "sta": dict(steps=3),
    "wasserstein": dict(steps=3, sinkhorn_iters=5, eps_growth=1.0),
}
BUDGET_PARAM = {"fgsm": "eps", "pgd": "eps", "pgd_l2": "eps", "mifgsm": "eps", "ddn": "max_norm",
                "apgd_ce": "eps", "apgd_dlr": "eps", "apgd_t": "eps", "fab_t": "eps",
                "square": "eps", "autoattack": "eps", "wasserstein": "eps"}
TEST_BUDGET = {"pgd_l2": 1.0, "ddn": 1.0, "wasserstein": 0.01}
# A zero Wasserstein radius is only approximately the identity (entropic projection).
ZERO_BUDGET_IDENTITY = sorted(set(BUDGET_PARAM) - {"wasserstein"})


def _linear_apply(weights, x):
  return x.reshape(x.shape[0], -1) @ weights


# A model is (apply_fn, params); params are jit arguments, not constants baked into the graph.
LINEAR = (_linear_apply, jnp.linspace(-1.0, 1.0, 32 * 32 * 3 * 10).reshape(-1, 10))


@functools.lru_cache(maxsize=None)
def _jitted(name, apply_fn, **static):
  """One compiled attack per (name, apply_fn, static params); the budget stays traced."""
  attack = registry.get(name)

  def run(params, x, y, key, budget):
    logits_fn = functools.partial(apply_fn, params)
    if budget is None:
      return attack(logits_fn, x, y, key, **static)
    return attack(logits_fn, x, y, key, **{BUDGET_PARAM[name]: budget}, **static)

  return jax.jit(run)


def _run(name, model, x, y, key, budget=None, **static):
  apply_fn, params = model
  static = {**FAST_PARAMS[name], **static}
  budget = None if budget is None else jnp.float32(budget)
  return _jitted(name, apply_fn, **static)(params, x, y, key, budget)


def _l2(delta):
  return np.linalg.norm(np.asarray(delta).reshape(delta.shape[0], -1), axis=1)


@pytest.fixture(scope="module")
def batch():
  x = jax.random.uniform(jax.random.key(0), (8, 32, 32, 3))
  x = x.at[0].set(0.0).at[1].set(1.0)  # pixels at the box edges
  return x, jnp.arange(8) % 10


@pytest.fixture(scope="module")
def tiny(trained_tiny):
  """((apply_fn, variables), x, y) on 32 test images."""
  model, variables, test_set, _ = trained_tiny
  return ((model.apply, variables), jnp.asarray(test_set.images[:32]),
          jnp.asarray(test_set.labels[:32]))


_correct = conftest.correct_predictions


def _accuracy(model, x, y):
  return float(np.mean(_correct(model, x, y)))


def test_registry_lists_every_attack_and_rejects_unknown_names():
  assert set(FAST_PARAMS) == set(registry.ATTACKS) == set(registry.NORMS)
  assert registry.get("pgd") is pgd_suite.pgd_linf
  with pytest.raises(ValueError, match="known: apgd_ce, apgd_dlr"):
    registry.get("nope")


@pytest.mark.parametrize("name", sorted(registry.ATTACKS))
def test_attack_stays_in_box_and_ball_and_is_deterministic(batch, name):
  x, y = batch
  budget = TEST_BUDGET.get(name, 8 / 255 if name in BUDGET_PARAM else None)
  x_adv = _run(name, LINEAR, x, y, jax.random.key(1), budget)
  assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
  conftest.assert_in_box(x_adv)
  np.testing.assert_array_equal(x_adv, _run(name, LINEAR, x, y, jax.random.key(1), budget))
  norm = "l2" if name == "ddn" else registry.NORMS[name]  # DDN's max_norm is an L2 ball
  if norm == "l2":
    assert _l2(x_adv - x).max() <= budget + 1e-4
  elif norm == "linf":
    assert float(jnp.max(jnp.abs(x_adv - x))) <= budget + 1e-6


@pytest.mark.parametrize("name", ZERO_BUDGET_IDENTITY)
def test_zero_budget_leaves_inputs_unchanged(batch, name):
  x, y = batch
  np.testing.assert_array_equal(_run(name, LINEAR, x, y, jax.random.key(2), 0.0), x)


def test_cw_margin_loss_matches_numpy():
  logits = np.array([[2.0, 1.0, -1.0], [0.5, 3.0, 2.5], [1.0, 1.0, 0.0]], np.float32)
  y = np.array([0, 2, 1])
  expected = np.array([1.0 - 2.0, 3.0 - 2.5, 1.0 - 1.0])
  np.testing.assert_allclose(pgd_suite.cw_margin_loss(jnp.asarray(logits), jnp.asarray(y)),
                             expected, atol=1e-6)


LINF_SWEEP = (0.0, 1 / 255, 4 / 255, 8 / 255)
# Attacks whose own test files do not sweep eps already (APGD-CE, FAB-T, Square, Wasserstein do).
SWEEPS = {
    "fgsm": ({}, LINF_SWEEP),
    "pgd": (dict(steps=5, restarts=1, loss="ce"), LINF_SWEEP),
    "mifgsm": ({}, LINF_SWEEP),
    "pgd_l2": (dict(restarts=1), (0.0, 0.1, 0.5, 1.0)),
    "apgd_t": ({}, LINF_SWEEP),
    "autoattack": (dict(version="fast"), LINF_SWEEP),
}


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_success_rate_grows_with_eps(tiny, name):
  model, x, y = tiny
  static, sweep = SWEEPS[name]
  errors = [1.0 - _accuracy(model, _run(name, model, x, y, jax.random.key(0), eps,
                                            **static), y)
            for eps in sweep]
  # One FGSM step is a linearisation: a larger step can overshoot, so its error may dip by an
  # image or two between budgets; the iterative attacks must not lose any ground.
  allowed_dip = 2 / len(y) if name == "fgsm" else 0.0
  assert all(b >= a - allowed_dip for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] >= errors[0] + 0.3, errors


@pytest.mark.parametrize("name,params", [
    ("cw", dict(steps=25, binary_search_steps=2, lr=0.05)),
    ("ddn", dict(steps=20)),
])
def test_minimal_norm_attacks_fool_the_trained_model(tiny, name, params):
  model, x, y = tiny
  x, y = x[:16], y[:16]
  x_adv = _run(name, model, x, y, jax.random.key(0), **params)
  conftest.assert_in_box(x_adv)
  clean_correct = _correct(model, x, y)
  adv_correct = _correct(model, x_adv, y)
  assert adv_correct.mean() <= 0.25 * clean_correct.mean(), (adv_correct.mean(),
                                                              clean_correct.mean())
  changed = np.any(np.asarray(x_adv != x).reshape(len(x), -1), axis=1)
  assert not np.any(adv_correct & changed)  # every returned perturbation fools the model
  assert np.all(_l2(x_adv - x)[changed] < 3.0)  # minimal-norm: far below the box diameter
