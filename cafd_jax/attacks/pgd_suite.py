"""PGD variants: L-inf and L2, cross-entropy or CW-margin loss, random restarts."""

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from cafd_jax import losses
# The package re-exports the function ``pgd``, which shadows the module of that name.
from cafd_jax.attacks.pgd import projected_gradient_ascent

LogitsFn = Callable[[jnp.ndarray], jnp.ndarray]
LossFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (logits, labels) -> [B]


def cw_margin_loss(logits: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """Largest logit of another class minus the true-class logit, per example: [B]."""
  true_logit = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  others = jnp.where(jax.nn.one_hot(y, logits.shape[1], dtype=bool), -jnp.inf, logits)
  return jnp.max(others, axis=1) - true_logit


def loss_by_name(name: str) -> LossFn:
  """"ce" (cross-entropy) or "cw" (CW margin); both grow as the attack succeeds."""
  if name == "ce":
    return losses.cross_entropy
  if name == "cw":
    return cw_margin_loss
  raise ValueError(f"Unknown attack loss {name!r}; known: 'ce', 'cw'.")


def l2_norms(v: jnp.ndarray) -> jnp.ndarray:
  """Per-example L2 norm over all but the batch axis: [B]."""
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim))))


def _per_example(values: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
  return values.reshape((-1,) + (1,) * (like.ndim - 1))


def project_l2(delta: jnp.ndarray, radius: float | jnp.ndarray) -> jnp.ndarray:
  """Scales each example of delta into the L2 ball of the given radius."""
  norms = l2_norms(delta)
  scale = jnp.minimum(1.0, radius / jnp.maximum(norms, 1e-12))
  return delta * _per_example(scale, delta)


def _best_of_restarts(attack_once: Callable[[jax.Array], jnp.ndarray], logits_fn: LogitsFn,
                      x: jnp.ndarray, y: jnp.ndarray, key: jax.Array,
                      restarts: int) -> jnp.ndarray:
  """Runs attack_once per restart key; keeps per example the first fooling run, else the last.

  A single run uses ``key`` itself, so one restart equals the plain attack with that key.
  """
  if restarts == 1:
    return jax.lax.stop_gradient(attack_once(key))

  def body(carry, restart_key):
    best, fooled = carry
    x_adv = attack_once(restart_key)
    fooled_now = jnp.argmax(logits_fn(x_adv), axis=-1) != y
    best = jnp.where(_per_example(fooled, x), best, x_adv)
    return (best, fooled | fooled_now), None

  init = (x, jnp.zeros(x.shape[0], dtype=bool))
  (best, _), _ = jax.lax.scan(body, init, jax.random.split(key, restarts))
  return jax.lax.stop_gradient(best)


def pgd_linf(logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray, key: jax.Array, *,
             eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 20,
             restarts: int = 1, loss: str = "ce", random_start: bool = True) -> jnp.ndarray:
  """Untargeted L-inf PGD with ``restarts`` random restarts and a CE or CW-margin loss."""
  chex.assert_rank(x, 4)
  loss_fn = loss_by_name(loss)
  objective = lambda z: loss_fn(logits_fn(z), y)
  attack_once = lambda k: projected_gradient_ascent(
      objective, x, k, eps=eps, step_size=step_size, steps=steps, random_start=random_start)
  return _best_of_restarts(attack_once, logits_fn, x, y, key, restarts)


def _uniform_l2_ball(key: jax.Array, shape: tuple[int, ...], radius: float) -> jnp.ndarray:
  """Samples per example uniformly from the L2 ball of the given radius."""
  direction_key, radius_key = jax.random.split(key)
  direction = jax.random.normal(direction_key, shape)
  direction = direction / _per_example(jnp.maximum(l2_norms(direction), 1e-12), direction)
  dim = 1
  for size in shape[1:]:
    dim *= size
  radii = radius * jax.random.uniform(radius_key, (shape[0],)) ** (1.0 / dim)
  return direction * _per_example(radii, direction)


def _l2_ascent(objective: Callable[[jnp.ndarray], jnp.ndarray], x: jnp.ndarray, key: jax.Array,
               *, eps: float, step_size: float, steps: int, random_start: bool) -> jnp.ndarray:
  """Normalised-gradient ascent of sum(objective) over the L2 ball around x, inside [0,1]."""
  if random_start:
    x_adv = jnp.clip(x + _uniform_l2_ball(key, x.shape, eps), 0.0, 1.0)
  else:
    x_adv = x
  grad_fn = jax.grad(lambda z: jnp.sum(objective(z)))

  def step(_, current):
    grad = grad_fn(current)
    grad = grad / _per_example(jnp.maximum(l2_norms(grad), 1e-12), grad)
    delta = project_l2(current + step_size * grad - x, eps)
    return jnp.clip(x + delta, 0.0, 1.0)

  return jax.lax.fori_loop(0, steps, step, x_adv)


def pgd_l2(logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray, key: jax.Array, *,
           eps: float = 0.5, step_size: float = 0.1, steps: int = 20, restarts: int = 1,
           loss: str = "ce", random_start: bool = True) -> jnp.ndarray:
  """Untargeted L2 PGD: normalised-gradient steps, L2-ball projection, clipping to [0,1]."""
  chex.assert_rank(x, 4)
  loss_fn = loss_by_name(loss)
  objective = lambda z: loss_fn(logits_fn(z), y)
  attack_once = lambda k: _l2_ascent(objective, x, k, eps=eps, step_size=step_size,
                                     steps=steps, random_start=random_start)
  return _best_of_restarts(attack_once, logits_fn, x, y, key, restarts)
