"""Standard CIFAR augmentation in JAX: zero-padded random crop and horizontal flip."""

import jax
import jax.numpy as jnp


def random_crop_flip(key: jax.Array, images: jnp.ndarray, padding: int = 4) -> jnp.ndarray:
  """Per-example random crop of the zero-padded image, then a random horizontal flip."""
  batch, height, width, channels = images.shape
  crop_key, flip_key = jax.random.split(key)
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * padding + 1)
  crop = lambda image, offset: jax.lax.dynamic_slice(
      image, (offset[0], offset[1], 0), (height, width, channels))
  cropped = jax.vmap(crop)(padded, offsets)
  flip = jax.random.bernoulli(flip_key, 0.5, (batch, 1, 1, 1))
  return jnp.where(flip, cropped[:, :, ::-1, :], cropped)
