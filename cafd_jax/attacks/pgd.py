"""L-inf projected gradient ascent: the engine of PGD (``pgd_suite``) and the CAF attack."""

from typing import Callable

import chex
import jax
import jax.numpy as jnp


Objective = Callable[[jnp.ndarray], jnp.ndarray]  # images -> per-example loss [B]


def projected_gradient_ascent(objective: Objective, x: jnp.ndarray, key: jax.Array, *,
                              eps: float, step_size: float, steps: int,
                              random_start: bool = True) -> jnp.ndarray:
  """Maximises ``sum(objective(x_adv))`` over the L-inf ball of radius eps around x in [0,1]."""
  chex.assert_rank(x, 4)
  lower = jnp.clip(x - eps, 0.0, 1.0)
  upper = jnp.clip(x + eps, 0.0, 1.0)
  if random_start:
    x_adv = x + jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
  else:
    x_adv = x
  x_adv = jnp.clip(x_adv, lower, upper)
  grad_fn = jax.grad(lambda z: jnp.sum(objective(z)))

  def step(_, current):
    update = step_size * jnp.sign(grad_fn(current))
    return jnp.clip(current + update, lower, upper)

  x_adv = jax.lax.fori_loop(0, steps, step, x_adv)
  return jax.lax.stop_gradient(x_adv)
