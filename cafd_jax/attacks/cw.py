"""Carlini-Wagner L2 (Carlini & Wagner 2017), untargeted, after foolbox 3's L2 CW attack."""

from typing import Callable

import chex
import jax
import jax.numpy as jnp
import optax

from cafd_jax.attacks import pgd_suite

LogitsFn = Callable[[jnp.ndarray], jnp.ndarray]

_TANH_SHRINK = 0.999999  # keeps arctanh finite at pixels 0 and 1


def _to_model_space(w: jnp.ndarray) -> jnp.ndarray:
  return (jnp.tanh(w) + 1.0) / 2.0


def _to_attack_space(x: jnp.ndarray) -> jnp.ndarray:
  return jnp.arctanh((2.0 * x - 1.0) * _TANH_SHRINK)


def _is_adversarial(logits: jnp.ndarray, y: jnp.ndarray, confidence: float) -> jnp.ndarray:
  """Misclassified even after the true logit is raised by ``confidence``."""
  boosted = logits + confidence * jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype)
  return jnp.argmax(boosted, axis=-1) != y


def cw_l2(logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray, key: jax.Array, *,
          steps: int = 100, confidence: float = 1.0, initial_const: float = 1.0,
          lr: float = 0.01, binary_search_steps: int = 4) -> jnp.ndarray:
  """Minimal-L2 untargeted CW attack; per example the smallest successful x_adv, else x.

  Minimises ||x_adv - x||^2 + c * max(z_y - max_{i != y} z_i + confidence, 0) over a tanh-space
  variable with Adam, and binary-searches c per example (times 10 until a first success).
  ``key`` is unused (the attack is deterministic).
  """
  del key
  chex.assert_rank(x, 4)
  batch = x.shape[0]
  w_clean = _to_attack_space(x)
  x_reconstructed = _to_model_space(w_clean)
  optimizer = optax.adam(lr)

  def objective(delta_w, consts):
    x_adv = _to_model_space(w_clean + delta_w)
    logits = logits_fn(x_adv)
    squared = jnp.sum(jnp.square(x_adv - x_reconstructed), axis=(1, 2, 3))
    margin = pgd_suite.cw_margin_loss(logits, y)  # > 0 iff misclassified
    hinge = jnp.maximum(confidence - margin, 0.0)
    return jnp.sum(squared + consts * hinge), (x_adv, logits)

  grad_fn = jax.grad(objective, has_aux=True)

  def search_step(i, carry):
    consts, lower, upper, best_adv, best_norm = carry
    if binary_search_steps >= 10:  # foolbox: the last try uses the best known upper bound
      consts = jnp.where(i == binary_search_steps - 1, jnp.minimum(upper, 1e10), consts)

    def opt_step(_, inner):
      delta_w, opt_state, found, best_adv, best_norm = inner
      grad, (x_adv, logits) = grad_fn(delta_w, consts)
      updates, opt_state = optimizer.update(grad, opt_state, delta_w)
      delta_w = optax.apply_updates(delta_w, updates)
      success = _is_adversarial(logits, y, confidence)
      norms = pgd_suite.l2_norms(x_adv - x)
      improved = success & (norms < best_norm)
      best_adv = jnp.where(improved[:, None, None, None], x_adv, best_adv)
      best_norm = jnp.where(improved, norms, best_norm)
      return delta_w, opt_state, found | success, best_adv, best_norm

    delta_w = jnp.zeros_like(x)
    inner = (delta_w, optimizer.init(delta_w), jnp.zeros(batch, bool), best_adv, best_norm)
    _, _, found, best_adv, best_norm = jax.lax.fori_loop(0, steps, opt_step, inner)
    upper = jnp.where(found, consts, upper)
    lower = jnp.where(found, lower, consts)
    consts = jnp.where(jnp.isinf(upper), consts * 10.0, (lower + upper) / 2.0)
    return consts, lower, upper, best_adv, best_norm

  carry = (jnp.full((batch,), initial_const, x.dtype), jnp.zeros((batch,), x.dtype),
           jnp.full((batch,), jnp.inf, x.dtype), x, jnp.full((batch,), jnp.inf, x.dtype))
  *_, best_adv, _ = jax.lax.fori_loop(0, binary_search_steps, search_step, carry)
  return jax.lax.stop_gradient(best_adv)
