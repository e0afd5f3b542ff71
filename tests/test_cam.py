"""CAF maps against a direct NumPy computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafd_jax import cam
from conftest import assert_in_box


def _bilinear_numpy(maps: np.ndarray, size: int) -> np.ndarray:
  """Half-pixel-centre bilinear upsampling (PyTorch align_corners=False) of [B, h, w, ...]."""
  in_size = maps.shape[1]
  src = np.clip((np.arange(size) + 0.5) * in_size / size - 0.5, 0, in_size - 1)
  low = np.floor(src).astype(int)
  high = np.minimum(low + 1, in_size - 1)
  frac = src - low
  def along(weights, axis):  # weights [size] broadcast over every other axis of maps
    shape = [1] * maps.ndim
    shape[axis] = size
    return weights.reshape(shape)

  rows = maps[:, low] * along(1 - frac, 1) + maps[:, high] * along(frac, 1)
  return rows[:, :, low] * along(1 - frac, 2) + rows[:, :, high] * along(frac, 2)


def _min_max_numpy(maps):
  axes = tuple(range(1, maps.ndim))
  low, high = maps.min(axis=axes, keepdims=True), maps.max(axis=axes, keepdims=True)
  return (maps - low) / (high - low + 1e-8)


def _weights(kernel, labels):
  return cam.class_weights(jnp.asarray(kernel), jnp.asarray(labels))


@pytest.fixture()
def example():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(3, 4, 4, 6)).astype(np.float32)
  kernel = rng.normal(size=(6, 5)).astype(np.float32)
  labels = np.array([0, 3, 4], np.int32)
  return features, kernel, labels


def test_cam_matches_numpy(example):
  features, kernel, labels = example
  expected = np.maximum(np.einsum("bhwc,cb->bhw", features, kernel[:, labels]), 0)
  expected = _bilinear_numpy(_min_max_numpy(expected), 32)
  got = cam.class_activation_features(jnp.asarray(features), _weights(kernel, labels), "cam",
                                      (32, 32))
  assert got.shape == (3, 32, 32)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  assert_in_box(got, atol=1e-6)


def test_weighted_features_match_numpy(example):
  features, kernel, labels = example
  weighted = np.maximum(features * kernel[:, labels].T[:, None, None, :], 0)
  expected = _bilinear_numpy(_min_max_numpy(weighted), 16)
  got = cam.class_activation_features(jnp.asarray(features), _weights(kernel, labels),
                                      "weighted_features", (16, 16))
  assert got.shape == (3, 16, 16, 6)
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_plain_features_are_upsampled_only(example):
  features, _, _ = example
  got = cam.class_activation_features(jnp.asarray(features), None, "features", (8, 8))
  np.testing.assert_allclose(got, _bilinear_numpy(features, 8), atol=1e-5)


def test_class_source_prediction_uses_argmax(example):
  features, kernel, _ = example
  logits = jnp.asarray(np.eye(5, dtype=np.float32)[[2, 2, 1]])
  tapped_apply = lambda images, perturbation=None: (logits, jnp.asarray(features))
  images = jnp.zeros((3, 32, 32, 3))
  by_prediction = cam.make_caf_fn(tapped_apply, "cam", "prediction", head_kernel=jnp.asarray(kernel))
  by_label = cam.make_caf_fn(tapped_apply, "cam", "label", head_kernel=jnp.asarray(kernel))
  np.testing.assert_allclose(by_prediction(images, jnp.array([0, 0, 0])),
                             by_label(images, jnp.array([2, 2, 1])), atol=1e-6)


def test_bad_kind_class_source_and_weights_raise():
  tapped_apply = lambda images, perturbation=None: images
  with pytest.raises(ValueError, match="caf kind"):
    cam.make_caf_fn(tapped_apply, "gradcam")
  with pytest.raises(ValueError, match="class_source"):
    cam.make_caf_fn(tapped_apply, "cam", "random")
  with pytest.raises(ValueError, match="caf.weights"):
    cam.make_caf_fn(tapped_apply, "cam", "label", weights="scorecam")
  with pytest.raises(ValueError, match="GAP \\+ dense"):
    cam.make_caf_fn(tapped_apply, "cam", "label", weights="cam")  # no head kernel


def test_caf_is_differentiable_in_the_input(example):
  features, kernel, labels = example
  tapped_apply = lambda images, perturbation=None: (jnp.zeros((3, 5)),
                                                    jnp.asarray(features) * jnp.mean(images))
  caf_fn = cam.make_caf_fn(tapped_apply, "weighted_features", "label",
                           head_kernel=jnp.asarray(kernel))
  grad = jax.grad(lambda x: jnp.sum(caf_fn(x, jnp.asarray(labels)) ** 2))(
      jnp.full((3, 8, 8, 3), 0.5))
  assert np.all(np.isfinite(np.asarray(grad)))



def _upsample_axis_numpy(maps: np.ndarray, axis: int, size: int) -> np.ndarray:
  """Half-pixel-centre linear upsampling of one axis (as ``_bilinear_numpy``, any axis)."""
  in_size = maps.shape[axis]
  src = np.clip((np.arange(size) + 0.5) * in_size / size - 0.5, 0, in_size - 1)
  low = np.floor(src).astype(int)
  high = np.minimum(low + 1, in_size - 1)
  frac = (src - low).reshape([-1 if a == axis else 1 for a in range(maps.ndim)])
  return np.take(maps, low, axis) * (1 - frac) + np.take(maps, high, axis) * frac


@pytest.mark.parametrize("shape, output_size", [((3, 4, 4, 6), (32, 32)), ((3, 2, 2, 5), (32, 32)),
                                                ((2, 4, 2), (32, 16)), ((2, 3, 5, 4), (7, 9)),
                                                ((2, 8, 8, 3), (8, 8))])
def test_caf_distance_is_the_mse_of_the_upsampled_maps(shape, output_size):
  rng = np.random.default_rng(1)
  a, b = rng.uniform(size=shape).astype(np.float32), rng.uniform(size=shape).astype(np.float32)
  upsampled = lambda m: _upsample_axis_numpy(_upsample_axis_numpy(m.astype(np.float64), 1,
                                                                  output_size[0]),
                                             2, output_size[1])
  expected = np.mean((upsampled(a) - upsampled(b)).reshape(shape[0], -1) ** 2, axis=1)
  got = cam.caf_distance(jnp.asarray(a), jnp.asarray(b), output_size)
  assert got.shape == (shape[0],)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # and its gradient is that of the upsampled MSE (what the attacks ascend)
  direct = lambda x: jnp.sum(jnp.mean((cam._upsample(x, output_size)
                                       - cam._upsample(jnp.asarray(b), output_size)) ** 2,
                                      axis=tuple(range(1, len(shape)))))
  np.testing.assert_allclose(
      jax.grad(lambda x: jnp.sum(cam.caf_distance(x, jnp.asarray(b), output_size)))(jnp.asarray(a)),
      jax.grad(direct)(jnp.asarray(a)), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("kind", ["cam", "weighted_features", "features"])
def test_caf_at_feature_resolution_upsamples_to_the_default(example, kind):
  features, kernel, labels = example
  tapped_apply = lambda images, perturbation=None: (jnp.zeros((3, 5)), jnp.asarray(features))
  images, labels = jnp.zeros((3, 32, 32, 3)), jnp.asarray(labels)
  full = cam.make_caf_fn(tapped_apply, kind, "label", head_kernel=jnp.asarray(kernel))
  low = cam.make_caf_fn(tapped_apply, kind, "label", head_kernel=jnp.asarray(kernel),
                        upsample=False)
  assert low(images, labels).shape[1:3] == (4, 4)
  np.testing.assert_allclose(cam._upsample(low(images, labels), (32, 32)), full(images, labels),
                             atol=1e-6)
