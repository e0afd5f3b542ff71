"""Square Attack (Andriushchenko et al. 2020), L-inf: score-based random search, no gradients.

Follows torchattacks' ``Square`` (itself Croce & Hein's auto-attack code) for the L-inf norm:
vertical-stripe initialisation with +-eps, one random square per iteration whose side shrinks
by the (query-rescaled) p schedule, margin acceptance, and examples frozen once fooled. Only
forward calls of ``logits_fn`` are made.
"""

import math
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from cafd_jax import losses
from cafd_jax.attacks import pgd_suite

LogitsFn = Callable[[jnp.ndarray], jnp.ndarray]

# (last iteration of the piece, divisor of p_init); beyond the last piece p_init / 512.
_P_PIECES = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
             (6000, 128), (8000, 256))
_LOSSES = ("margin", "ce")


def p_selection(it: int, n_queries: int, p_init: float = 0.8,
                resc_schedule: bool = True) -> float:
  """Fraction of the image a square covers at iteration ``it`` (0-based), as in the reference.

  With ``resc_schedule`` the iteration is first mapped onto a 10000-query budget,
  ``int(it / n_queries * 10000)``, so the schedule spans any ``n_queries``.
  """
  if resc_schedule:
    it = int(it / n_queries * 10000)
  for last, divisor in _P_PIECES:
    if it <= last:
      return p_init / divisor
  return p_init / 512


def square_sizes(n_queries: int, height: int, width: int, channels: int, p_init: float = 0.8,
                 resc_schedule: bool = True) -> np.ndarray:
  """Side length of the square per iteration: [n_queries] int32, at least 1."""
  n_features = channels * height * width
  return np.array([
      max(int(round(math.sqrt(
          p_selection(i, n_queries, p_init, resc_schedule) * n_features / channels))), 1)
      for i in range(n_queries)
  ], dtype=np.int32)


def _check_loss(loss: str) -> None:
  if loss not in _LOSSES:
    raise ValueError(f"Unknown Square-attack loss {loss!r}; known: 'margin', 'ce'.")


def _margin_and_loss(logits: jnp.ndarray, y: jnp.ndarray,
                     loss: str) -> tuple[jnp.ndarray, jnp.ndarray]:
  """True-class logit minus the best other logit, and the loss to minimise: both [B]."""
  margin = -pgd_suite.cw_margin_loss(logits, y)
  if loss == "margin":
    return margin, margin
  return margin, -losses.cross_entropy(logits, y)


class SquareRun(NamedTuple):
  """Per-example result of one Square-attack run."""
  x_best: jnp.ndarray  # Best point found: [B, H, W, C].
  margin: jnp.ndarray  # True-class logit minus the best other logit at x_best: [B].
  fooled: jnp.ndarray  # argmax of the logits at x_best differs from y: [B] bool.
  queries: jnp.ndarray  # Forward queries spent on the example, the initial one included: [B].


def square_linf_single_run(
    logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray, key: jax.Array, *,
    eps: float | jnp.ndarray = 8 / 255, n_queries: int = 5000, p_init: float = 0.8,
    loss: str = "margin", resc_schedule: bool = True, active: jnp.ndarray | None = None,
) -> SquareRun:
  """One run of the L-inf Square Attack (the reference's ``attack_single_run``).

  Examples outside ``active`` (default: all; they keep margin +inf) and examples already
  fooled (margin <= 0) are frozen and spend no queries. The loop stops early once every active
  example is fooled, which changes no result. The initial stripes are queried as iteration -1
  of the loop, so the model is traced once.
  """
  chex.assert_rank(x, 4)
  _check_loss(loss)
  batch, height, width, channels = x.shape
  sizes = square_sizes(n_queries, height, width, channels, p_init, resc_schedule)
  sizes = jnp.asarray(sizes if n_queries > 0 else np.ones((1,), np.int32))  # Never indexed empty.
  if active is None:
    active = jnp.ones((batch,), dtype=bool)
  expand = lambda v: v[:, None, None, None]
  lower, upper = x - eps, x + eps
  rows = jnp.arange(height)[None, :, None, None]
  cols = jnp.arange(width)[None, None, :, None]

  init_key, loop_key = jax.random.split(key)
  # Vertical stripes: one sign per example, column and channel, constant along the height.
  stripes = jax.random.rademacher(init_key, (batch, 1, width, channels), dtype=x.dtype)
  x_init = jnp.clip(x + eps * stripes, 0.0, 1.0)

  def square_step(i, x_best):
    side = sizes[jnp.maximum(i, 0)]
    # One draw per example: the square's top-left corner, uniform over
    # {0, ..., dim - side - 1} as the reference's random_int, and a sign per channel.
    draws = jax.random.uniform(jax.random.fold_in(loop_key, i), (batch, 2 + channels))
    top = jnp.floor(draws[:, 0] * jnp.maximum(height - side, 0)).astype(jnp.int32)
    left = jnp.floor(draws[:, 1] * jnp.maximum(width - side, 0)).astype(jnp.int32)
    in_square = ((rows >= expand(top)) & (rows < expand(top + side)) &
                 (cols >= expand(left)) & (cols < expand(left + side)))
    signs = jnp.where(draws[:, None, None, 2:] < 0.5, -1.0, 1.0).astype(x.dtype)
    x_new = x_best + jnp.where(in_square, 2.0 * eps * signs, 0.0)
    return jnp.clip(jnp.clip(x_new, lower, upper), 0.0, 1.0)

  def cond(carry):
    i, run, _ = carry
    return (i < n_queries) & jnp.any(active & (run.margin > 0.0))

  def body(carry):
    i, run, loss_min = carry
    to_fool = active & (run.margin > 0.0)
    # Iteration -1 queries the initial point; its loss beats the initial +inf loss.
    x_new = jnp.where(i < 0, x_init, square_step(i, run.x_best))
    logits = logits_fn(x_new)
    margin, loss_new = _margin_and_loss(logits, y, loss)
    improved = to_fool & (loss_new < loss_min)
    loss_min = jnp.where(improved, loss_new, loss_min)
    accepted = improved | (to_fool & (margin <= 0.0))
    run = SquareRun(x_best=jnp.where(expand(accepted), x_new, run.x_best),
                    margin=jnp.where(accepted, margin, run.margin),
                    fooled=jnp.where(accepted, jnp.argmax(logits, axis=-1) != y, run.fooled),
                    queries=run.queries + to_fool.astype(jnp.int32))
    return i + 1, run, loss_min

  inf = jnp.full((batch,), jnp.inf, x.dtype)
  run = SquareRun(x_best=x_init, margin=inf, fooled=jnp.zeros((batch,), dtype=bool),
                  queries=jnp.zeros((batch,), jnp.int32))
  _, run, _ = jax.lax.while_loop(cond, body, (jnp.int32(-1), run, inf))
  return run


def square_linf(logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray, key: jax.Array, *,
                eps: float | jnp.ndarray = 8 / 255, n_queries: int = 5000, p_init: float = 0.8,
                restarts: int = 1, loss: str = "margin",
                resc_schedule: bool = True) -> jnp.ndarray:
  """Untargeted L-inf Square Attack; per example the adversarial found, else x.

  As in the reference, examples misclassified on x are not attacked, each restart attacks only
  the examples still classified correctly, and the result of a run counts as adversarial when
  its argmax differs from y. ``n_queries`` bounds the iterations per restart; a single restart
  uses ``key`` itself.
  """
  chex.assert_rank(x, 4)
  _check_loss(loss)
  robust = jnp.argmax(logits_fn(x), axis=-1) == y

  def restart(carry, restart_key):
    adv, robust = carry
    run = square_linf_single_run(
        logits_fn, x, y, restart_key, eps=eps, n_queries=n_queries, p_init=p_init, loss=loss,
        resc_schedule=resc_schedule, active=robust)
    fooled = robust & run.fooled  # The reference's argmax check on the run's result.
    adv = jnp.where(fooled[:, None, None, None], run.x_best, adv)
    return (adv, robust & ~fooled), None

  keys = key[None] if restarts == 1 else jax.random.split(key, restarts)
  (adv, _), _ = jax.lax.scan(restart, (x, robust), keys)
  return jax.lax.stop_gradient(adv)
