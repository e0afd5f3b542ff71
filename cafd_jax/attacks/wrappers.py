"""Wrappers that turn a defended model into a logits function an attack can differentiate.

BPDA (Athalye et al. 2018): the forward pass runs the real, possibly non-differentiable
preprocessor; the backward pass differentiates a surrogate (the identity by default).
EOT: a randomised model is replaced by the log of its expected softmax over draws.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp

LogitsFn = Callable[[jnp.ndarray], jnp.ndarray]
Preprocess = Callable[[jnp.ndarray], jnp.ndarray]
RandomLogitsFn = Callable[[jnp.ndarray, jax.Array], jnp.ndarray]  # (x, key) -> logits


def straight_through(preprocess: Preprocess, x: jnp.ndarray,
                     surrogate: Optional[Preprocess] = None) -> jnp.ndarray:
  """preprocess(x) in value; the gradient of ``surrogate`` (identity if None) in backward."""
  approx = x if surrogate is None else surrogate(x)
  # preprocess never sees a tangent, so host callbacks (JPEG) work under jax.grad.
  return approx + jax.lax.stop_gradient(preprocess(jax.lax.stop_gradient(x)) - approx)


def bpda(preprocess: Preprocess, logits_fn: LogitsFn,
         surrogate: Optional[Preprocess] = None) -> LogitsFn:
  """logits_fn(preprocess(x)), differentiated as if preprocess were ``surrogate``.

  ``preprocess`` may be any traceable map (a denoiser, bit-depth reduction) or a
  ``jax.pure_callback`` around host code (JPEG); it is never differentiated.
  """
  return lambda x: logits_fn(straight_through(preprocess, x, surrogate))


def _fingerprint(x: jnp.ndarray) -> jnp.ndarray:
  """A uint32 that changes with x, so each attack iterate gets fresh random draws."""
  total = jax.lax.stop_gradient(jnp.sum(x.astype(jnp.float32) * 1e3))
  return jax.lax.bitcast_convert_type(total, jnp.uint32)


def eot(random_logits_fn: RandomLogitsFn, key: jax.Array, samples: int) -> LogitsFn:
  """Log of the mean softmax of ``random_logits_fn`` over ``samples`` draws.

  Draw keys come from ``key`` folded with a fingerprint of the input, so the function is
  deterministic for a given input yet uses fresh draws at every attack iterate. Its
  gradient is the mean over draws of the per-draw gradients, as EOT prescribes.
  """
  if samples < 1:
    raise ValueError(f"EOT needs samples >= 1, got {samples}")

  def expected_logits(x):
    keys = jax.random.split(jax.random.fold_in(key, _fingerprint(x)), samples)
    probabilities = jax.lax.map(lambda k: jax.nn.softmax(random_logits_fn(x, k), axis=-1), keys)
    return jnp.log(jnp.mean(probabilities, axis=0) + 1e-12)

  return expected_logits
