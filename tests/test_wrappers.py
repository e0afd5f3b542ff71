"""BPDA and EOT wrappers: forward values, the gradients they give, and their use in PGD."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafd_jax.attacks import pgd_suite, wrappers


def _quantize(x):
  return jnp.round(x * 3.0) / 3.0  # 2-bit pixels: zero gradient almost everywhere


def _linear_logits(x):
  weights = jnp.linspace(-1.0, 1.0, x[0].size * 3).reshape(-1, 3)
  return x.reshape(x.shape[0], -1) @ weights


def _loss(logits_fn, x, y):
  return jnp.sum(pgd_suite.cw_margin_loss(logits_fn(x), y))


@pytest.fixture(scope="module")
def batch():
  x = jax.random.uniform(jax.random.key(0), (4, 4, 4, 3))
  return x, jnp.array([0, 1, 2, 0])


def test_bpda_forward_runs_the_preprocessor_and_backward_the_surrogate(batch):
  x, y = batch
  wrapped = wrappers.bpda(_quantize, _linear_logits)
  np.testing.assert_allclose(wrapped(x), _linear_logits(_quantize(x)), atol=1e-5)
  # Identity surrogate: the gradient is the model's gradient taken at the preprocessed input.
  expected = jax.grad(lambda z: _loss(_linear_logits, z, y))(_quantize(x))
  np.testing.assert_allclose(jax.grad(lambda z: _loss(wrapped, z, y))(x), expected, atol=1e-5)
  # The plain composition has no gradient at all: why BPDA is needed.
  plain = jax.grad(lambda z: _loss(lambda u: _linear_logits(_quantize(u)), z, y))(x)
  assert float(jnp.max(jnp.abs(plain))) == 0.0


def test_bpda_with_a_surrogate_uses_its_jacobian(batch):
  x, y = batch
  wrapped = wrappers.bpda(_quantize, _linear_logits, surrogate=lambda z: 2.0 * z)
  identity = wrappers.bpda(_quantize, _linear_logits)
  np.testing.assert_allclose(jax.grad(lambda z: _loss(wrapped, z, y))(x),
                             2.0 * jax.grad(lambda z: _loss(identity, z, y))(x), atol=1e-5)


def test_pgd_through_bpda_breaks_a_gradient_masking_preprocessor(trained_tiny):
  model, variables, test_set, _ = trained_tiny
  x, y = jnp.asarray(test_set.images[:32]), jnp.asarray(test_set.labels[:32])
  logits_fn = lambda z: model.apply(variables, z)
  quantize = lambda z: jnp.round(z * 15.0) / 15.0  # 4-bit pixels keep the images readable
  masked = lambda z: logits_fn(quantize(z))
  accuracy = lambda x_adv: float(jnp.mean(jnp.argmax(masked(x_adv), -1) == y))
  params = dict(eps=16 / 255, step_size=4 / 255, steps=10, random_start=False)
  naive = pgd_suite.pgd_linf(masked, x, y, jax.random.key(0), **params)
  adaptive = pgd_suite.pgd_linf(wrappers.bpda(quantize, logits_fn), x, y, jax.random.key(0),
                                **params)
  # Zero gradients leave PGD where it started; BPDA follows the real model's gradient.
  np.testing.assert_array_equal(naive, x)
  assert accuracy(x) >= 0.7, accuracy(x)  # the tiny model still reads 4-bit images
  assert accuracy(adaptive) <= accuracy(x) - 0.5, (accuracy(adaptive), accuracy(x))


def _noisy_logits(x, key):
  return _linear_logits(x + 0.1 * jax.random.normal(key, x.shape))


def test_eot_is_the_log_mean_softmax_over_draws(batch):
  x, _ = batch
  key = jax.random.key(3)
  wrapped = wrappers.eot(_noisy_logits, key, samples=4)
  keys = jax.random.split(jax.random.fold_in(key, wrappers._fingerprint(x)), 4)
  expected = np.log(np.mean([jax.nn.softmax(_noisy_logits(x, k)) for k in keys], axis=0))
  np.testing.assert_allclose(wrapped(x), expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(wrapped(x), wrapped(x))  # deterministic per input
  assert not np.allclose(wrapped(x), wrapped(x + 1e-3))  # fresh draws for a new iterate


def test_eot_of_a_deterministic_model_is_its_log_softmax(batch):
  x, y = batch
  wrapped = wrappers.eot(lambda z, _: _linear_logits(z), jax.random.key(0), samples=3)
  np.testing.assert_allclose(wrapped(x), jax.nn.log_softmax(_linear_logits(x)), atol=1e-5)
  np.testing.assert_allclose(
      jax.grad(lambda z: _loss(wrapped, z, y))(x),
      jax.grad(lambda z: _loss(lambda u: jax.nn.log_softmax(_linear_logits(u)), z, y))(x),
      atol=1e-5)
  with pytest.raises(ValueError, match="samples >= 1"):
    wrappers.eot(_noisy_logits, jax.random.key(0), samples=0)
