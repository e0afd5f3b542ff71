"""The CAF attack: L-inf PGD pushing the adversarial CAF away from the natural one."""

import jax
import jax.numpy as jnp

from cafd_jax import cam
from cafd_jax.attacks.pgd import projected_gradient_ascent


def caf_attack(caf_fn: cam.CafFn, x: jnp.ndarray, y: jnp.ndarray, key: jax.Array, *,
               eps: float = 8 / 255, step_size: float = 0.01, steps: int = 100,
               random_start: bool = True) -> jnp.ndarray:
  """Maximises the per-example MSE between caf(x_adv, y) and caf(x, y), both upsampled to the
  input size (``cam.caf_distance``; ``caf_fn`` may return them at any resolution)."""
  natural = jax.lax.stop_gradient(caf_fn(x, y))
  objective = lambda z: cam.caf_distance(caf_fn(z, y), natural, x.shape[1:3])
  return projected_gradient_ascent(objective, x, key, eps=eps, step_size=step_size, steps=steps,
                                   random_start=random_start)
