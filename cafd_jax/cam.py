"""Class activation features (CAF): last conv features seen through a class's dense weights.

Kinds (``config.caf.attack_kind`` / ``config.caf.loss_kind``), all upsampled bilinearly to the
input size so that the distance weighs every pixel equally:
  * ``weighted_features``: ReLU(features[..., c] * w[c, y]) kept per channel, min-max
    normalised per image: [B, H, W, C]. The reference attack's CAF.
  * ``cam``: ReLU(sum_c features[..., c] * w[c, y]) min-max normalised per image: [B, H, W],
    the classic class activation map (Zhou et al. 2016).
  * ``features``: the plain last-layer features [B, H, W, C]: the reference code's
    denoiser-loss variant, and the ablation without class weighting.
The class y is the true label or the classifier's own prediction (``config.caf.class_source``;
the reference uses the prediction of each input).
"""

from typing import Callable

import chex
import jax
import jax.numpy as jnp

CAF_KINDS = ("weighted_features", "cam", "features")
CLASS_SOURCES = ("prediction", "label")
_EPS = 1e-8

CafFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
FeaturesFn = Callable[[jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]]


def class_weights(kernel: jnp.ndarray, classes: jnp.ndarray) -> jnp.ndarray:
  """Dense weights of each example's class: kernel [C, K], classes [B] -> [B, C]."""
  chex.assert_rank(kernel, 2)
  chex.assert_rank(classes, 1)
  return jnp.take(kernel, classes, axis=1).T


def _min_max(maps: jnp.ndarray) -> jnp.ndarray:
  """Per-image min-max normalisation to [0, 1]."""
  axes = tuple(range(1, maps.ndim))
  low = jnp.min(maps, axis=axes, keepdims=True)
  high = jnp.max(maps, axis=axes, keepdims=True)
  return (maps - low) / (high - low + _EPS)


def _upsample(maps: jnp.ndarray, output_size: tuple[int, int]) -> jnp.ndarray:
  """Bilinear resize of [B, h, w, ...] maps to [B, H, W, ...] (half-pixel centres)."""
  return jax.image.resize(maps, (maps.shape[0], *output_size, *maps.shape[3:]), method="bilinear")


def class_activation_map(features: jnp.ndarray, weights: jnp.ndarray,
                         output_size: tuple[int, int]) -> jnp.ndarray:
  """ReLU(features . weights), min-max normalised per image, upsampled: [B, H, W]."""
  chex.assert_rank(features, 4)
  chex.assert_equal_shape([features[:, 0, 0, :], weights])
  cam = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", features, weights))
  return _upsample(_min_max(cam), output_size)


def weighted_feature_maps(features: jnp.ndarray, weights: jnp.ndarray,
                          output_size: tuple[int, int]) -> jnp.ndarray:
  """ReLU(features * weights) per channel, min-max normalised per image, upsampled."""
  chex.assert_rank(features, 4)
  chex.assert_equal_shape([features[:, 0, 0, :], weights])
  caf = jax.nn.relu(features * weights[:, None, None, :])
  return _upsample(_min_max(caf), output_size)


def class_activation_features(features: jnp.ndarray, kernel: jnp.ndarray, classes: jnp.ndarray,
                              kind: str, output_size: tuple[int, int]) -> jnp.ndarray:
  """The CAF of ``kind`` for the given classes."""
  if kind == "features":
    return _upsample(features, output_size)
  weights = class_weights(kernel, classes)
  if kind == "weighted_features":
    return weighted_feature_maps(features, weights, output_size)
  if kind == "cam":
    return class_activation_map(features, weights, output_size)
  raise ValueError(f"caf kind must be one of {CAF_KINDS}, got {kind!r}.")


def make_caf_fn(features_fn: FeaturesFn, kernel: jnp.ndarray, kind: str,
                class_source: str = "prediction") -> CafFn:
  """Builds ``caf(images, labels)`` from ``features_fn(images) -> (logits, features)``."""
  if kind not in CAF_KINDS:
    raise ValueError(f"caf kind must be one of {CAF_KINDS}, got {kind!r}.")
  if class_source not in CLASS_SOURCES:
    raise ValueError(f"caf.class_source must be one of {CLASS_SOURCES}, got {class_source!r}.")

  def caf(images: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    chex.assert_rank(images, 4)
    logits, features = features_fn(images)
    classes = labels if class_source == "label" else jnp.argmax(logits, axis=-1)
    return class_activation_features(features, kernel, jax.lax.stop_gradient(classes), kind,
                                     images.shape[1:3])

  return caf
