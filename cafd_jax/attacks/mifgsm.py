"""MI-FGSM (Dong et al. 2018): L-inf iterative FGSM with a momentum of L1-normalised gradients."""

from typing import Callable

import jax
import jax.numpy as jnp

from cafd_jax import losses

LogitsFn = Callable[[jnp.ndarray], jnp.ndarray]


def mifgsm(logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray, key: jax.Array, *,
           eps: float = 8 / 255, steps: int = 10, decay: float = 1.0) -> jnp.ndarray:
  """Untargeted MI-FGSM on the cross-entropy, step size eps / steps, no random start.

  ``key`` is unused (the attack is deterministic); it keeps the common signature.
  """
  del key
  alpha = eps / steps
  lower = jnp.clip(x - eps, 0.0, 1.0)
  upper = jnp.clip(x + eps, 0.0, 1.0)
  grad_fn = jax.grad(lambda z: jnp.sum(losses.cross_entropy(logits_fn(z), y)))

  def step(_, carry):
    x_adv, momentum = carry
    grad = grad_fn(x_adv)
    l1 = jnp.sum(jnp.abs(grad), axis=tuple(range(1, grad.ndim)), keepdims=True)
    momentum = decay * momentum + grad / jnp.maximum(l1, 1e-12)
    x_adv = jnp.clip(x_adv + alpha * jnp.sign(momentum), lower, upper)
    return x_adv, momentum

  x_adv, _ = jax.lax.fori_loop(0, steps, step, (x, jnp.zeros_like(x)))
  return jax.lax.stop_gradient(x_adv)
