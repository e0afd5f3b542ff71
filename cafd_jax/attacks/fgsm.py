"""FGSM (Goodfellow et al. 2015): one signed-gradient L-inf step on the cross-entropy."""

from typing import Callable

import jax
import jax.numpy as jnp

from cafd_jax import losses

LogitsFn = Callable[[jnp.ndarray], jnp.ndarray]


def fgsm(logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray, key: jax.Array, *,
         eps: float = 8 / 255) -> jnp.ndarray:
  """Untargeted FGSM: x + eps * sign(grad CE), clipped to [0,1]. ``key`` is unused."""
  del key  # Deterministic attack; the key keeps the common signature.
  grad = jax.grad(lambda z: jnp.sum(losses.cross_entropy(logits_fn(z), y)))(x)
  x_adv = jnp.clip(x + eps * jnp.sign(grad), 0.0, 1.0)
  return jax.lax.stop_gradient(x_adv)
