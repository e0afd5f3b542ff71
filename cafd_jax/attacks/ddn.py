"""Decoupled Direction and Norm L2 attack (Rony et al. 2019), untargeted."""

import math
from typing import Callable

import chex
import jax
import jax.numpy as jnp

from cafd_jax import losses
from cafd_jax.attacks import pgd_suite

LogitsFn = Callable[[jnp.ndarray], jnp.ndarray]

_LEVELS = 256


def _quantize(x: jnp.ndarray) -> jnp.ndarray:
  return jnp.round(x * (_LEVELS - 1)) / (_LEVELS - 1)


def _with_logits(logits_fn: LogitsFn, z: jnp.ndarray,
                 y: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Summed cross-entropy, and the logits as auxiliary output."""
  logits = logits_fn(z)
  return jnp.sum(losses.cross_entropy(logits, y)), logits


def ddn(logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray, key: jax.Array, *,
        steps: int = 100, gamma: float = 0.05, init_norm: float = 1.0, quantize: bool = True,
        max_norm: float | None = None) -> jnp.ndarray:
  """Minimal-L2 DDN; per example the smallest-norm adversarial found, else x.

  Steps along the L2-normalised CE gradient with size alpha annealed (cosine) from 1 to 0.01,
  then rescales delta to a norm that shrinks by (1 - gamma) while adversarial and grows by
  (1 + gamma) otherwise; pixels are rounded to 1/255 levels when ``quantize``. With
  ``max_norm``, the result is projected into that L2 ball (fixed-budget evaluation; the
  projection may undo the quantisation). ``key`` draws random directions where a gradient
  vanishes.
  """
  chex.assert_rank(x, 4)
  batch = x.shape[0]
  expand = lambda v: v[:, None, None, None]
  worst_norm = pgd_suite.l2_norms(jnp.maximum(x, 1.0 - x))
  grad_fn = jax.grad(lambda z: _with_logits(logits_fn, z, y), has_aux=True)

  def step(i, carry):
    delta, norm, best_delta, best_l2 = carry
    alpha = 0.01 + (1.0 - 0.01) * (1.0 + jnp.cos(math.pi * i / steps)) / 2.0
    grad, logits = grad_fn(x + delta)
    l2 = pgd_suite.l2_norms(delta)
    is_adv = jnp.argmax(logits, axis=-1) != y
    improved = is_adv & (l2 < best_l2)
    best_l2 = jnp.where(improved, l2, best_l2)
    best_delta = jnp.where(expand(improved), delta, best_delta)
    grad_norms = pgd_suite.l2_norms(grad)
    random_dir = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    grad = jnp.where(expand(grad_norms == 0), random_dir, grad)
    grad = grad / expand(jnp.maximum(pgd_suite.l2_norms(grad), 1e-12))
    delta = delta + alpha * grad
    norm = jnp.minimum(norm * jnp.where(is_adv, 1.0 - gamma, 1.0 + gamma), worst_norm)
    delta = delta * expand(norm / jnp.maximum(pgd_suite.l2_norms(delta), 1e-12))
    x_adv = x + delta
    if quantize:
      x_adv = _quantize(x_adv)
    delta = jnp.clip(x_adv, 0.0, 1.0) - x
    return delta, norm, best_delta, best_l2

  zeros = jnp.zeros_like(x)
  carry = (zeros, jnp.full((batch,), init_norm, x.dtype), zeros,
           jnp.full((batch,), jnp.inf, x.dtype))
  _, _, best_delta, _ = jax.lax.fori_loop(0, steps, step, carry)
  if max_norm is not None:
    best_delta = pgd_suite.project_l2(best_delta, max_norm)
  return jax.lax.stop_gradient(jnp.clip(x + best_delta, 0.0, 1.0))
