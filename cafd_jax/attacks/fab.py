"""Fast Adaptive Boundary attack, L-inf (Croce & Hein 2020): FAB-T as in AutoAttack, and FAB.

Follows torchattacks' ``FAB`` (after the auto-attack code): each step linearises the decision
boundary at the iterate, projects both the iterate and the clean input onto that hyperplane
intersected with the [0,1] box (minimal L-inf displacement), moves to a convex combination
of the two projections (overshooting by ``eta``), and, once misclassified, records the iterate
if it is the closest so far and steps back towards the clean input by ``beta``.
"""

import math
from typing import Callable

import chex
import jax
import jax.numpy as jnp

LogitsFn = Callable[[jnp.ndarray], jnp.ndarray]
# Iterate [B, ...] -> (linearised boundary value [B], its gradient [B, ...]).
BoundaryFn = Callable[[jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]]

_NOT_FOUND = 1e10  # the reference's distance for "no adversarial example yet"


def _take(values: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
  """values[i, index[i]] for a 2-D ``values`` and a 1-D ``index``."""
  return jnp.take_along_axis(values, index[:, None], axis=1)[:, 0]


def projection_linf(points: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Minimal-L-inf displacement d, per row, with w.(points + d) = b and points + d in [0,1].

  points, w: [N, D]; b: [N]. Where the hyperplane does not meet the box, d moves each
  coordinate to the box face that brings w.(points + d) closest to b. Components with w = 0
  stay 0. Same sort-and-bisection algorithm (and iteration count) as the reference.
  """
  chex.assert_rank([points, w, b], [2, 2, 1])
  t = points
  dim = w.shape[1]
  sign = jnp.where(jnp.sum(w * t, axis=1) - b >= 0, 1.0, -1.0).astype(w.dtype)
  w = w * sign[:, None]
  b = b * sign
  # Now w.t >= b: every coordinate moves in the direction that decreases w.x, i.e. towards
  # 1 where w < 0 (a = 1) and towards 0 elsewhere; p is the room left in that direction.
  a = (w < 0).astype(w.dtype)
  nonzero = (w != 0).astype(w.dtype)
  d = (a - t) * nonzero
  p = a - t * (2.0 * a - 1.0)
  desc = jnp.argsort(p, axis=1)[:, ::-1]
  b = b - jnp.sum(w * t, axis=1)  # required change of w.x, <= 0
  b0 = jnp.sum(w * d, axis=1)  # largest possible decrease, at the box corner
  w_desc = jnp.take_along_axis(w, desc, axis=1)
  p_desc = jnp.take_along_axis(p, desc, axis=1)
  # With |d_i| = min(lam, p_i), for lam between p_desc[k+1] and p_desc[k]:
  # w.d = sb[k] - s[k] * lam.
  s = jnp.cumsum(jnp.abs(w_desc), axis=1)
  sb = jnp.cumsum(-w_desc * jnp.take_along_axis(d, desc, axis=1), axis=1) + b0[:, None]

  inside_smallest = b - (sb[:, -1] - s[:, -1] * p_desc[:, -1]) > 0  # lam < every p_i
  bisect = (b - b0 > 0) & ~inside_smallest

  def bisection_step(_, bounds):
    lower, upper = bounds
    mid = (lower + upper) // 2
    above = b - (_take(sb, mid) - _take(s, mid) * _take(p_desc, mid)) > 0
    return jnp.where(above, mid, lower), jnp.where(above, upper, mid)

  rows = w.shape[0]
  bounds = (jnp.zeros(rows, jnp.int32), jnp.full(rows, dim - 1, jnp.int32))
  iterations = math.ceil(math.log2(dim)) if dim > 1 else 0
  segment, _ = jax.lax.fori_loop(0, iterations, bisection_step, bounds)

  lam_small = jnp.maximum((b - sb[:, -1]) / -s[:, -1], 0.0)[:, None]
  d_small = (2.0 * a - 1.0) * lam_small
  lam = jnp.maximum((b - _take(sb, segment)) / -_take(s, segment), 0.0)[:, None]
  d_segment = jnp.minimum(lam, d) * a + jnp.maximum(-lam, d) * (1.0 - a)
  d = jnp.where(inside_smallest[:, None], d_small, jnp.where(bisect[:, None], d_segment, d))
  return d * nonzero


def _linf_norms(v: jnp.ndarray) -> jnp.ndarray:
  return jnp.max(jnp.abs(v.reshape(v.shape[0], -1)), axis=1)


def _expand(values: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
  return values.reshape((-1,) + (1,) * (like.ndim - 1))


def _predict(logits_fn: LogitsFn, x: jnp.ndarray) -> jnp.ndarray:
  return jnp.argmax(logits_fn(x), axis=-1)


def _targeted_boundary(logits_fn: LogitsFn, y: jnp.ndarray, target: jnp.ndarray) -> BoundaryFn:
  """z_target - z_y and its input gradient (one backward pass for the whole batch)."""

  def boundary(z):
    logits, vjp = jax.vjp(logits_fn, z)
    num_classes = logits.shape[-1]
    direction = (jax.nn.one_hot(target, num_classes, dtype=logits.dtype)
                 - jax.nn.one_hot(y, num_classes, dtype=logits.dtype))
    (grad,) = vjp(direction)
    return jnp.sum(logits * direction, axis=-1), grad

  return boundary


def _target_margin_boundary(logits_fn: LogitsFn, target: jnp.ndarray) -> BoundaryFn:
  """z_target - max over the other classes, and its input gradient."""

  def boundary(z):
    logits, vjp = jax.vjp(logits_fn, z)
    num_classes = logits.shape[-1]
    is_target = jax.nn.one_hot(target, num_classes, dtype=bool)
    rival = jnp.argmax(jnp.where(is_target, -jnp.inf, logits), axis=-1)
    direction = is_target.astype(logits.dtype) - jax.nn.one_hot(rival, num_classes,
                                                                 dtype=logits.dtype)
    (grad,) = vjp(direction)
    return jnp.sum(logits * direction, axis=-1), grad

  return boundary


def _untargeted_boundary(logits_fn: LogitsFn, y: jnp.ndarray) -> BoundaryFn:
  """z_c - z_y and its gradient for the class c whose linearised boundary is closest (L-inf)."""

  def boundary(z):
    logits, vjp = jax.vjp(logits_fn, z)
    batch, num_classes = logits.shape
    eye = jnp.eye(num_classes, dtype=logits.dtype)
    grads = jax.vmap(lambda row: vjp(jnp.broadcast_to(row, logits.shape))[0])(eye)
    grads = jnp.moveaxis(grads, 0, 1).reshape(batch, num_classes, -1)  # [B, C, D]
    rows = jnp.arange(batch)
    diff = logits - logits[rows, y][:, None]
    diff = jnp.where(jax.nn.one_hot(y, num_classes, dtype=bool), 1e10, diff)
    diff_grads = grads - grads[rows, y][:, None]
    dist = jnp.abs(diff) / (1e-12 + jnp.sum(jnp.abs(diff_grads), axis=-1))
    closest = jnp.argmin(dist, axis=1)
    return diff[rows, closest], diff_grads[rows, closest].reshape(z.shape)

  return boundary


def _fab_run(boundary: BoundaryFn, logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray,
             x_start: jnp.ndarray, *, steps: int, alpha_max: float, eta: float, beta: float,
             hit: jnp.ndarray | None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """One FAB run from x_start: per example the closest adversarial iterate and its distance.

  Adversarial means "not classified as y" (the reference), or "classified as ``hit``" if
  given. Examples without an adversarial iterate get x and distance ``_NOT_FOUND``.
  """
  batch = x.shape[0]
  x0 = x.reshape(batch, -1)

  def step(_, carry):
    x1, adv, best = carry
    diff, grad = boundary(x1)
    w = grad.reshape(batch, -1)
    b = -diff + jnp.sum(w * x1.reshape(batch, -1), axis=1)
    d3 = projection_linf(jnp.concatenate([x1.reshape(batch, -1), x0]),
                         jnp.concatenate([w, w]), jnp.concatenate([b, b]))
    d1 = d3[:batch].reshape(x.shape)
    d2 = d3[batch:].reshape(x.shape)
    a0 = jnp.maximum(jnp.max(jnp.abs(d3), axis=1), 1e-8)
    a1, a2 = a0[:batch], a0[batch:]
    alpha = _expand(jnp.minimum(jnp.maximum(a1 / (a1 + a2), 0.0), alpha_max), x)
    x1 = jnp.clip((x1 + eta * d1) * (1.0 - alpha) + (x + eta * d2) * alpha, 0.0, 1.0)
    prediction = _predict(logits_fn, x1)
    is_adv = prediction != y if hit is None else prediction == hit
    dist = _linf_norms(x1 - x)
    closer = is_adv & (dist < best)
    adv = jnp.where(_expand(closer, x), x1, adv)
    best = jnp.where(closer, dist, best)
    x1 = jnp.where(_expand(is_adv, x), x + (x1 - x) * beta, x1)
    return x1, adv, best

  init = (x_start, x, jnp.full((batch,), _NOT_FOUND, x.dtype))
  _, adv, best = jax.lax.fori_loop(0, steps, step, init)
  return adv, best


def _fab_restarts(boundary: BoundaryFn, logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray,
                  key: jax.Array, *, eps: float | jnp.ndarray, steps: int, restarts: int,
                  alpha_max: float, eta: float, beta: float,
                  hit: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The closest adversarial over ``restarts`` FAB runs, and its distance (or ``_NOT_FOUND``).

  The first run starts at x, the others at a random point at L-inf distance
  min(best so far, eps) / 2.
  """

  def restart(r, carry):
    adv, best = carry
    noise = 2.0 * jax.random.uniform(jax.random.fold_in(key, r), x.shape, x.dtype) - 1.0
    radius = _expand(jnp.minimum(best, eps), x)
    random_start = jnp.clip(x + radius * noise / _expand(_linf_norms(noise), x) * 0.5, 0.0, 1.0)
    x_start = jnp.where(r > 0, random_start, x)
    run_adv, run_best = _fab_run(boundary, logits_fn, x, y, x_start, steps=steps,
                                 alpha_max=alpha_max, eta=eta, beta=beta, hit=hit)
    closer = run_best < best
    return jnp.where(_expand(closer, x), run_adv, adv), jnp.where(closer, run_best, best)

  init = (x, jnp.full((x.shape[0],), _NOT_FOUND, x.dtype))
  return jax.lax.fori_loop(0, restarts, restart, init)


def fab_targeted_once(logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray, target: jnp.ndarray,
                      key: jax.Array, *, steps: int = 100, restarts: int = 1,
                      alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                      eps: float = 8 / 255) -> jnp.ndarray:
  """Minimum-L-inf targeted FAB: per example the closest point found classified as ``target``.

  Returns per example the closest iterate classified as ``target`` [B] over all restarts,
  else x; x also where x is already misclassified. Unlike FAB-T's runs in ``fab_targeted``
  (the reference's), which linearise z_target - z_y and accept any misclassification, this
  linearises z_target minus the largest other logit, so that iterates which a third class
  captures still head for the target; from a correctly classified point the two agree.
  ``eps`` only sets the radius of the random starts of restarts after the first.
  """
  chex.assert_rank(x, 4)
  correct = _predict(logits_fn, x) == y
  adv, best = _fab_restarts(_target_margin_boundary(logits_fn, target), logits_fn, x, y, key,
                            eps=eps, steps=steps, restarts=restarts, alpha_max=alpha_max,
                            eta=eta, beta=beta, hit=target)
  found = correct & (best < _NOT_FOUND)
  return jax.lax.stop_gradient(jnp.where(_expand(found, x), adv, x))


def fab_targeted(logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray, key: jax.Array, *,
                 eps: float = 8 / 255, steps: int = 100, restarts: int = 1,
                 n_target_classes: int = 9, alpha_max: float = 0.1, eta: float = 1.05,
                 beta: float = 0.9) -> jnp.ndarray:
  """FAB-T (AutoAttack "standard"): targeted FAB against the 2nd, 3rd, ... highest clean logit.

  Targets are tried in that order, ``restarts`` runs each, while some example is still
  classified correctly. An example keeps its result from the first target whose runs find a
  misclassified point within L-inf distance eps (the closest over that target's restarts),
  else x.
  """
  chex.assert_rank(x, 4)
  clean_logits = logits_fn(x)
  num_classes = clean_logits.shape[-1]
  if not 1 <= n_target_classes <= num_classes - 1:
    raise ValueError(f"n_target_classes must be in [1, {num_classes - 1}], "
                     f"got {n_target_classes}.")
  ascending = jnp.argsort(clean_logits, axis=-1)
  robust = jnp.argmax(clean_logits, axis=-1) == y

  def attack_target(rank, carry):
    x_adv, robust = carry
    target = ascending[:, num_classes - 2 - rank]  # the (rank + 2)-th highest clean logit

    def run(carry):
      x_adv, robust = carry
      adv, best = _fab_restarts(_targeted_boundary(logits_fn, y, target), logits_fn, x, y,
                                jax.random.fold_in(key, rank), eps=eps, steps=steps,
                                restarts=restarts, alpha_max=alpha_max, eta=eta, beta=beta)
      fooled = robust & (best <= eps)
      return jnp.where(_expand(fooled, x), adv, x_adv), robust & ~fooled

    return jax.lax.cond(jnp.any(robust), run, lambda carry: carry, (x_adv, robust))

  x_adv, _ = jax.lax.fori_loop(0, n_target_classes, attack_target, (x, robust))
  return jax.lax.stop_gradient(x_adv)


def fab(logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray, key: jax.Array, *,
        eps: float = 8 / 255, steps: int = 100, restarts: int = 1, alpha_max: float = 0.1,
        eta: float = 1.05, beta: float = 0.9) -> jnp.ndarray:
  """Untargeted FAB: linearises the closest class boundary (one backward pass per class).

  An example keeps the closest adversarial over the restarts if it is within eps, else x.
  """
  chex.assert_rank(x, 4)
  correct = _predict(logits_fn, x) == y
  adv, best = _fab_restarts(_untargeted_boundary(logits_fn, y), logits_fn, x, y, key, eps=eps,
                            steps=steps, restarts=restarts, alpha_max=alpha_max, eta=eta,
                            beta=beta)
  fooled = correct & (best <= eps)
  return jax.lax.stop_gradient(jnp.where(_expand(fooled, x), adv, x))
