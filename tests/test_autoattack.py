"""AutoAttack: the ensemble is at least as strong as each of its stages, and keeps x otherwise."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafd_jax.attacks import apgd, autoattack, fab, square

EPS = 2 / 255
SMALL = dict(steps=5, n_target_classes=2, square_queries=30)


@pytest.fixture(scope="module")
def setup(trained_tiny):
  model, variables, test_set, _ = trained_tiny
  logits_fn = functools.partial(model.apply, variables)
  x, y = jnp.asarray(test_set.images[:24]), jnp.asarray(test_set.labels[:24])
  return logits_fn, x, y


def _accuracy(logits_fn, x, y):
  return float(jnp.mean(jnp.argmax(logits_fn(x), -1) == y))


def test_ensemble_is_at_least_as_strong_as_each_stage(setup):
  logits_fn, x, y = setup
  key = jax.random.key(0)
  x_adv = jax.jit(lambda k: autoattack.autoattack(logits_fn, x, y, k, eps=EPS, **SMALL))(key)
  ensemble = _accuracy(logits_fn, x_adv, y)
  stage_keys = jax.random.split(key, 4)  # the stages' keys, in order
  stages = {
      "apgd-ce": apgd.apgd_ce(logits_fn, x, y, stage_keys[0], eps=EPS, steps=5),
      "apgd-t": apgd.apgd_targeted(logits_fn, x, y, stage_keys[1], eps=EPS, steps=5,
                                   n_target_classes=2),
      "fab-t": fab.fab_targeted(logits_fn, x, y, stage_keys[2], eps=EPS, steps=5,
                                n_target_classes=2),
      "square": square.square_linf(logits_fn, x, y, stage_keys[3], eps=EPS, n_queries=30),
  }
  accuracies = {name: _accuracy(logits_fn, adv, y) for name, adv in stages.items()}
  # Per example: robust to the ensemble only if robust to every stage run with the same key.
  robust_to_all = np.ones(len(y), bool)
  for adv in stages.values():
    robust_to_all &= np.asarray(jnp.argmax(logits_fn(adv), -1) == y)
  assert ensemble == pytest.approx(float(robust_to_all.mean())), (ensemble, accuracies)
  assert ensemble <= min(accuracies.values())
  assert ensemble < _accuracy(logits_fn, x, y)  # the budget is large enough to matter here
  assert float(jnp.max(jnp.abs(x_adv - x))) <= EPS + 1e-6


def test_examples_it_cannot_fool_come_back_unchanged(setup):
  logits_fn, x, y = setup
  x_adv = autoattack.autoattack(logits_fn, x, y, jax.random.key(1), eps=EPS, version="fast",
                                steps=5, n_target_classes=2)
  still_correct = np.asarray(jnp.argmax(logits_fn(x_adv), -1) == y)
  changed = np.any(np.asarray(x_adv != x).reshape(len(x), -1), axis=1)
  assert not np.any(still_correct & changed)


def test_unknown_version_is_rejected(setup):
  logits_fn, x, y = setup
  with pytest.raises(ValueError, match="Unknown AutoAttack version 'rand'"):
    autoattack.autoattack(logits_fn, x, y, jax.random.key(0), version="rand")
