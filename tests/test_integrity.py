"""Integrity checks: each fires on the violation it names, also on a real masked model."""

import functools

import jax
import jax.numpy as jnp
import pytest

from cafd_jax import integrity
from cafd_jax.attacks import pgd_suite, square


def _row(attack, accuracy, eps=8 / 255, defense="cafd", threat="unseen"):
  return {"attack": attack, "defense": defense, "threat_model": threat, "model": "vgg",
          "eps": eps, "accuracy": accuracy, "n": 1000}


def _statuses(findings, check):
  return [f["status"] for f in findings if f["check"] == check]


def test_accuracy_rising_with_eps_is_flagged():
  ok = [_row("pgd", 0.8, 2 / 255), _row("pgd", 0.5, 4 / 255), _row("pgd", 0.3, 8 / 255)]
  bad = ok[:2] + [_row("pgd", 0.6, 8 / 255)]
  assert _statuses(integrity.run_checks(ok), "accuracy_falls_with_eps") == ["ok"]
  assert _statuses(integrity.run_checks(bad), "accuracy_falls_with_eps") == ["violated"]


def test_white_box_above_unseen_is_flagged():
  rows = [_row("pgd", 0.40), _row("pgd", 0.55, threat="white_box")]
  assert _statuses(integrity.run_checks(rows), "white_box_not_above_unseen") == ["violated"]
  rows[1]["accuracy"] = 0.10
  assert _statuses(integrity.run_checks(rows), "white_box_not_above_unseen") == ["ok"]


def test_zero_eps_must_match_clean():
  rows = [_row("none", 0.90, eps=0.0), _row("pgd", 0.90, eps=0.0), _row("fgsm", 0.70, eps=0.0)]
  assert sorted(_statuses(integrity.run_checks(rows), "zero_eps_matches_clean")) == [
      "ok", "violated"]


@pytest.mark.parametrize("square_accuracy,expected", [(0.30, "ok"), (0.05, "violated")])
def test_square_far_stronger_than_gradients_is_flagged(square_accuracy, expected):
  rows = [_row("pgd", 0.40), _row("apgd_ce", 0.32), _row("square", square_accuracy)]
  assert _statuses(integrity.run_checks(rows),
                   "square_not_stronger_than_gradients") == [expected]


def test_white_box_square_is_held_against_bpda_gradient_attacks_too():
  rows = [_row("pgd", 0.40, threat="white_box"), _row("pgd", 0.10, threat="bpda"),
          _row("square", 0.20, threat="white_box")]
  assert _statuses(integrity.run_checks(rows), "square_not_stronger_than_gradients") == ["ok"]
  rows[1]["accuracy"] = 0.35  # now Square beats white-box and BPDA PGD alike
  assert _statuses(integrity.run_checks(rows),
                   "square_not_stronger_than_gradients") == ["violated"]


def test_a_gradient_masking_model_trips_the_square_check(trained_tiny):
  """Rounding the input to 3 levels per pixel zeroes every gradient: PGD stalls, Square works."""
  model, variables, test_set, _ = trained_tiny
  x, y = jnp.asarray(test_set.images[:32]), jnp.asarray(test_set.labels[:32])
  classify = functools.partial(model.apply, variables)
  masked = lambda z: classify(jnp.round(z * 2.0) / 2.0)
  accuracy = lambda z: float(jnp.mean(jnp.argmax(masked(z), -1) == y))
  eps = 32 / 255
  pgd_adv = pgd_suite.pgd_linf(masked, x, y, jax.random.key(0), eps=eps, step_size=8 / 255,
                               steps=10, random_start=False)
  square_adv = square.square_linf(masked, x, y, jax.random.key(0), eps=eps, n_queries=200)
  rows = [_row("none", accuracy(x), eps=0.0, defense="none"),
          _row("pgd", accuracy(pgd_adv), eps=eps, defense="none"),
          _row("square", accuracy(square_adv), eps=eps, defense="none")]
  findings = integrity.run_checks(rows)
  assert _statuses(findings, "square_not_stronger_than_gradients") == ["violated"], rows
