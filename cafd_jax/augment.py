"""Standard CIFAR augmentation in JAX: random crop of the padded image and horizontal flip,
random per step or alternating between epochs (airbench's)."""

import jax
import jax.numpy as jnp
import numpy as np


PAD_MODES = ("constant", "reflect")
FLIP_MODES = ("random", "alternating")


def random_crop_flip(key: jax.Array, images: jnp.ndarray, padding: int = 4,
                     pad_mode: str = "constant", flip: jnp.ndarray | None = None) -> jnp.ndarray:
  """Per-example random crop of the padded image, then a horizontal flip: random, or where the
  boolean ``flip`` [B] says (``alternating_flips``).

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
  if flip is None:
    flip = jax.random.bernoulli(flip_key, 0.5, (batch,))
  return jnp.where(flip.reshape(batch, 1, 1, 1), cropped[:, :, ::-1, :], cropped)


def first_epoch_flips(num_examples: int, seed: int) -> np.ndarray:
  """uint8 [N]: the examples mirrored in the first epoch of alternating flips, a fixed random
  half (a function of ``seed`` only, so resumes match)."""
  return np.random.default_rng([seed, 0xF11B]).integers(0, 2, num_examples, dtype=np.uint8)


def alternating_flips(first_epoch: jnp.ndarray, epoch: jnp.ndarray) -> jnp.ndarray:
  """airbench's alternating flip: each example is mirrored as ``first_epoch`` says in even
  epochs and the other way in odd ones, so that every pair of epochs shows both views."""
  return (first_epoch.astype(jnp.int32) + epoch) % 2 == 1
