"""Input-transform defenses: values against NumPy/SciPy/PIL, and gradients through BPDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from cafd_jax import defenses
from cafd_jax.attacks import wrappers
from conftest import assert_in_box


@pytest.fixture(scope="module")
def images():
  return jax.random.uniform(jax.random.key(0), (3, 16, 16, 3))


def test_bit_depth_rounds_to_the_grid(images):
  out = np.asarray(defenses.bit_depth(images, bits=3))
  np.testing.assert_allclose(out * 7, np.round(out * 7), atol=1e-5)
  assert np.max(np.abs(out - np.asarray(images))) <= 0.5 / 7 + 1e-6
  with pytest.raises(ValueError, match="bits must be in 1..8"):
    defenses.bit_depth(images, bits=0)


@pytest.mark.parametrize("size", [2, 3])
def test_median_filter_matches_scipy(images, size):
  expected = scipy.ndimage.median_filter(np.asarray(images), size=(1, size, size, 1),
                                         mode="reflect")
  np.testing.assert_allclose(defenses.median_filter(images, size), expected, atol=1e-6)


def test_jpeg_runs_in_jit_and_approximates_the_image(images):
  smooth = jnp.clip(jax.image.resize(images[:, :4, :4], images.shape, "linear"), 0, 1)
  out = jax.jit(lambda z: defenses.jpeg(z, quality=95))(smooth)
  assert out.shape == smooth.shape
  assert_in_box(out)
  assert float(jnp.mean(jnp.abs(out - smooth))) < 0.03
  low = defenses.jpeg(smooth, quality=10)
  assert float(jnp.mean(jnp.abs(low - smooth))) > float(jnp.mean(jnp.abs(out - smooth)))


def test_bpda_differentiates_through_jpeg_and_bit_depth(images):
  weights = jax.random.normal(jax.random.key(1), (images[0].size, 4))
  logits_fn = lambda z: z.reshape(z.shape[0], -1) @ weights
  for transform in (defenses.jpeg, defenses.bit_depth):
    wrapped = wrappers.bpda(transform, logits_fn)
    grad = jax.jit(jax.grad(lambda z, f=wrapped: jnp.sum(f(z)[:, 0])))(images)
    expected = jnp.broadcast_to(weights[:, 0].reshape(images.shape[1:]), images.shape)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
