"""Random crop and flip: crops come from the padded image, the padding mode is honoured."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafd_jax import augment


def _images(batch=64, size=8):
  return jax.random.uniform(jax.random.PRNGKey(0), (batch, size, size, 3)) + 0.5  # no zeros


@pytest.mark.parametrize("pad_mode", augment.PAD_MODES)
def test_every_crop_is_a_window_of_the_padded_image(pad_mode):
  images = _images()
  out = np.asarray(augment.random_crop_flip(jax.random.PRNGKey(1), images, 2, pad_mode))
  padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)), mode=pad_mode)
  for image, source in zip(out, padded):
    windows = [source[i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
    windows += [w[:, ::-1] for w in windows]
    assert any(np.array_equal(image, w) for w in windows)


def test_zero_padding_shows_zeros_and_reflect_padding_never_does():
  images = _images()
  key = jax.random.PRNGKey(2)
  constant = augment.random_crop_flip(key, images, 2, "constant")
  reflect = augment.random_crop_flip(key, images, 2, "reflect")
  assert jnp.any(constant == 0)
  assert not jnp.any(reflect == 0)


def test_unknown_pad_mode_is_refused():
  with pytest.raises(ValueError, match="pad_mode"):
    augment.random_crop_flip(jax.random.PRNGKey(0), _images(), 2, "edge")


def test_explicit_flips_mirror_exactly_those_images():
  images = _images(batch=16)
  flips = jnp.arange(16) % 3 == 0
  out = np.asarray(augment.random_crop_flip(jax.random.PRNGKey(3), images, 0, "constant", flips))
  expected = np.where(np.asarray(flips)[:, None, None, None], np.asarray(images)[:, :, ::-1],
                      np.asarray(images))
  np.testing.assert_array_equal(out, expected)


def test_alternating_flips_mirror_each_image_the_other_way_every_epoch():
  first = augment.first_epoch_flips(1000, seed=0)
  assert 0.4 < first.mean() < 0.6  # a random half
  np.testing.assert_array_equal(first, augment.first_epoch_flips(1000, seed=0))
  assert not np.array_equal(first, augment.first_epoch_flips(1000, seed=1))
  flips = [np.asarray(augment.alternating_flips(jnp.asarray(first), epoch)) for epoch in range(4)]
  np.testing.assert_array_equal(flips[0], first.astype(bool))
  for previous, current in zip(flips, flips[1:]):
    np.testing.assert_array_equal(current, ~previous)
