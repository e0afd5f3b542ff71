"""Square Attack (L-inf): schedule, constraints, no gradients, freezing, strength."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafd_jax.attacks import square
from conftest import assert_in_box


def _linear_apply(weights, x):
  return x.reshape(x.shape[0], -1) @ weights


LINEAR_WEIGHTS = jnp.linspace(-1.0, 1.0, 32 * 32 * 3 * 10).reshape(-1, 10)


@functools.lru_cache(maxsize=None)
def _jitted(apply_fn, **static):
  """One compiled attack per (apply_fn, static params); eps stays traced."""

  def run(params, x, y, key, eps):
    return square.square_linf(functools.partial(apply_fn, params), x, y, key, eps=eps, **static)

  return jax.jit(run)


def _attack(apply_fn, params, x, y, key, eps, **static):
  return _jitted(apply_fn, **static)(params, x, y, key, jnp.float32(eps))


LINEAR_STATIC = dict(n_queries=20, restarts=2)  # one compile for every LINEAR-model test
TINY_STATIC = dict(n_queries=300)  # one compile for the trained-model attacks


@pytest.fixture(scope="module")
def batch():
  x = jax.random.uniform(jax.random.key(0), (8, 32, 32, 3))
  x = x.at[0].set(0.0).at[1].set(1.0)  # pixels at the box edges
  y = jnp.argmax(_linear_apply(LINEAR_WEIGHTS, x), -1)  # every example starts correct
  return x, y


@pytest.fixture(scope="module")
def tiny(trained_tiny):
  """(apply_fn, variables, x, y): 16 test images the trained model classifies correctly."""
  model, variables, test_set, _ = trained_tiny
  correct = np.argmax(model.apply(variables, test_set.images), -1) == test_set.labels
  assert correct.sum() >= 16
  return (model.apply, variables, jnp.asarray(test_set.images[correct][:16]),
          jnp.asarray(test_set.labels[correct][:16]))


def _accuracy(apply_fn, params, x, y):
  return float(np.mean(np.argmax(apply_fn(params, x), -1) == np.asarray(y)))


def test_p_selection_pieces_and_query_rescaling():
  p_init = 0.8
  # Without rescaling the pieces end at iterations 10, 50, 200, ..., 8000.
  for it, divisor in [(0, 1), (10, 1), (11, 2), (50, 2), (51, 4), (200, 4), (201, 8),
                      (500, 8), (501, 16), (1000, 16), (1001, 32), (2000, 32), (2001, 64),
                      (4000, 64), (4001, 128), (6000, 128), (6001, 256), (8000, 256),
                      (8001, 512), (20000, 512)]:
    assert square.p_selection(it, 5000, p_init, resc_schedule=False) == p_init / divisor, it
  # Rescaled: iteration it of n_queries acts as int(it / n_queries * 10000).
  assert square.p_selection(1, 1000, p_init) == p_init  # 10
  assert square.p_selection(2, 1000, p_init) == p_init / 2  # 20
  assert square.p_selection(5, 1000, p_init) == p_init / 2  # 50
  assert square.p_selection(6, 1000, p_init) == p_init / 4  # 60
  assert square.p_selection(999, 1000, p_init) == p_init / 512  # 9990
  assert square.p_selection(2000, 5000, p_init) == p_init / 64  # 4000
  # Square sides on 32x32 images: round(sqrt(p * 1024)), at least 1.
  sizes = square.square_sizes(10000, 32, 32, 3, p_init, resc_schedule=False)
  assert sizes.shape == (10000,) and sizes.dtype == np.int32
  assert [sizes[0], sizes[11], sizes[51], sizes[201], sizes[501], sizes[9999]] == [
      29, 20, 14, 10, 7, 1]


def test_p_selection_matches_torchattacks():
  torch = pytest.importorskip("torch")
  torchattacks = pytest.importorskip("torchattacks")
  for n_queries, p_init, resc in [(5000, 0.8, True), (300, 0.8, True), (1000, 0.05, True),
                                  (777, 0.3, True), (9000, 0.8, False)]:
    reference = torchattacks.Square(torch.nn.Linear(1, 1), n_queries=n_queries, p_init=p_init,
                                    resc_schedule=resc)
    expected = [reference.p_selection(it) for it in range(n_queries)]
    got = [square.p_selection(it, n_queries, p_init, resc) for it in range(n_queries)]
    assert got == expected, (n_queries, p_init, resc)
    # The reference's side length: max(int(round(sqrt(p * n_features / c))), 1).
    np.testing.assert_array_equal(
        square.square_sizes(n_queries, 32, 32, 3, p_init, resc),
        [max(int(round(np.sqrt(p * 3072 / 3))), 1) for p in expected])


def test_attack_stays_in_box_and_ball_and_is_deterministic(batch):
  x, y = batch
  eps = 8 / 255
  x_adv = _attack(_linear_apply, LINEAR_WEIGHTS, x, y, jax.random.key(1), eps, **LINEAR_STATIC)
  assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
  assert_in_box(x_adv)
  assert float(jnp.max(jnp.abs(x_adv - x))) <= eps + 1e-6
  np.testing.assert_array_equal(
      x_adv, _attack(_linear_apply, LINEAR_WEIGHTS, x, y, jax.random.key(1), eps, **LINEAR_STATIC))
  # Every changed example is adversarial; the others come back as x.
  fooled = np.argmax(_linear_apply(LINEAR_WEIGHTS, x_adv), -1) != np.asarray(y)
  changed = np.any(np.asarray(x_adv != x).reshape(len(x), -1), axis=1)
  np.testing.assert_array_equal(changed, fooled)
  assert fooled.any()
  other = _attack(_linear_apply, LINEAR_WEIGHTS, x, y, jax.random.key(2), eps, **LINEAR_STATIC)
  assert not np.array_equal(x_adv, other)


def test_zero_eps_leaves_inputs_unchanged(batch):
  x, y = batch
  np.testing.assert_array_equal(
      _attack(_linear_apply, LINEAR_WEIGHTS, x, y, jax.random.key(2), 0.0, **LINEAR_STATIC), x)


def test_never_differentiates_the_model(batch):
  x, y = batch

  @jax.custom_jvp
  def logits_fn(z):
    return _linear_apply(LINEAR_WEIGHTS, z)

  @logits_fn.defjvp
  def _raise(primals, tangents):  # forward and reverse mode both go through the JVP rule
    raise AssertionError("the Square attack differentiated the model")

  with pytest.raises(AssertionError, match="differentiated"):
    jax.grad(lambda z: jnp.sum(logits_fn(z)))(x)
  attack = jax.jit(functools.partial(square.square_linf, logits_fn, **LINEAR_STATIC))
  x_adv = attack(x, y, jax.random.key(0), eps=jnp.float32(8 / 255))
  expected = _attack(_linear_apply, LINEAR_WEIGHTS, x, y, jax.random.key(0), 8 / 255,
                     **LINEAR_STATIC)
  np.testing.assert_array_equal(x_adv, expected)


def test_fooled_examples_stay_frozen_and_margin_only_decreases(tiny):
  apply_fn, params, x, y = tiny
  logits_fn = functools.partial(apply_fn, params)
  eps = 6 / 255  # some, not all, of the 16 images fall (when written: 3 in 30 queries, 6 in 120)
  run = jax.jit(functools.partial(square.square_linf_single_run, logits_fn, eps=eps,
                                  resc_schedule=False), static_argnames="n_queries")
  # Without rescaling, the first 30 iterations of a 120-query run are those of a 30-query run.
  short = run(x, y, jax.random.key(3), n_queries=30)
  long = run(x, y, jax.random.key(3), n_queries=120)
  done = np.asarray(short.margin <= 0)
  assert done.any() and not np.asarray(long.margin <= 0).all()
  np.testing.assert_array_equal(np.asarray(long.x_best)[done], np.asarray(short.x_best)[done])
  np.testing.assert_array_equal(np.asarray(long.queries)[done], np.asarray(short.queries)[done])
  assert np.all(np.asarray(short.queries)[~done] == 31)  # initial query + 30 iterations
  assert np.all(np.asarray(long.queries)[np.asarray(long.margin > 0)] == 121)
  assert np.all(np.asarray(long.margin) <= np.asarray(short.margin))  # margin loss only drops
  # Reported margins and fooled flags are those of the returned points.
  logits = logits_fn(long.x_best)
  true_logit = np.take_along_axis(np.asarray(logits), np.asarray(y)[:, None], 1)[:, 0]
  others = np.where(np.eye(10, dtype=bool)[np.asarray(y)], -np.inf, np.asarray(logits))
  np.testing.assert_allclose(long.margin, true_logit - others.max(1), atol=1e-4)
  np.testing.assert_array_equal(long.fooled, np.argmax(logits, -1) != np.asarray(y))
  assert float(jnp.max(jnp.abs(long.x_best - x))) <= eps + 1e-6


def test_success_rate_grows_with_eps(tiny):
  apply_fn, params, x, y = tiny
  # eps = 0 gives error 0 on these correctly classified images (see the zero-eps test).
  errors = [0.0] + [1.0 - _accuracy(apply_fn, params,
                                    _attack(apply_fn, params, x, y, jax.random.key(0), eps,
                                            **TINY_STATIC), y)
                    for eps in (1 / 255, 4 / 255, 16 / 255)]
  assert errors == sorted(errors), errors
  assert errors[1] < errors[-1] and errors[-1] >= 0.75, errors


def test_lowers_accuracy_of_trained_model(tiny):
  apply_fn, params, x, y = tiny
  x_adv = _attack(apply_fn, params, x, y, jax.random.key(1), 16 / 255, **TINY_STATIC)
  assert float(jnp.max(jnp.abs(x_adv - x))) <= 16 / 255 + 1e-6
  assert _accuracy(apply_fn, params, x_adv, y) <= 0.25  # from 100% on these images
