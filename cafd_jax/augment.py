"""Standard CIFAR augmentation in JAX: random crop of the padded image and horizontal flip."""

import jax
import jax.numpy as jnp


PAD_MODES = ("constant", "reflect")


def random_crop_flip(key: jax.Array, images: jnp.ndarray, padding: int = 4,
                     pad_mode: str = "constant") -> jnp.ndarray:
  """Per-example random crop of the padded image, then a random horizontal flip.

  ``pad_mode``: "constant" pads with zeros (the usual CIFAR recipe), "reflect" mirrors the
  border pixels (airbench's).
  """
  if pad_mode not in PAD_MODES:
    raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}.")
  batch, height, width, channels = images.shape
  crop_key, flip_key = jax.random.split(key)
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)), mode=pad_mode)
  offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * padding + 1)
  crop = lambda image, offset: jax.lax.dynamic_slice(
      image, (offset[0], offset[1], 0), (height, width, channels))
  cropped = jax.vmap(crop)(padded, offsets)
  flip = jax.random.bernoulli(flip_key, 0.5, (batch, 1, 1, 1))
  return jnp.where(flip, cropped[:, :, ::-1, :], cropped)
