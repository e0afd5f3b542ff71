"""Class activation features (CAF): deep features seen through a class's weights.

Kinds (``config.caf.attack_kind`` / ``config.caf.loss_kind``), all upsampled bilinearly to the
input size so that the distance weighs every pixel equally:
  * ``weighted_features``: ReLU(features[..., c] * w[c, y]) kept per channel, min-max
    normalised per image: [B, H, W, C]. The reference attack's CAF.
  * ``cam``: ReLU(sum_c features[..., c] * w[c, y]) min-max normalised per image: [B, H, W],
    the classic class activation map (Zhou et al. 2016).
  * ``features``: the plain features [B, H, W, C]: the reference code's denoiser-loss
    variant, and the ablation without class weighting.

Class weights w[., y] (``config.caf.weights``):
  * ``cam``: the dense kernel column of class y; needs a GAP + dense head and its input as the
    feature layer (the paper's CAM).
  * ``gradcam``: the spatial mean of d logit_y / d features (Selvaraju et al. 2017); any
    classifier, any feature layer (``config.caf.feature_layer``, see ``models.taps``). For a
    GAP + dense head it is the CAM weight divided by h*w.
  * ``gradcampp``: Grad-CAM++ (Chattopadhay et al. 2018), the closed form with first-order
    gradients: sum_ij alpha_ij ReLU(g_ij), alpha = g^2 / (2 g^2 + sum_ab A_ab g^3).
Gradient weights come from ``jax.vjp`` inside the caller's jitted step, and the attacks and
denoiser losses differentiate through them. The class y is the true label or the classifier's
own prediction (``config.caf.class_source``; the reference uses the prediction of each input).

The CAF distance (``caf_distance``) is the per-example MSE of the upsampled maps. The attacks and
the denoiser loss take the maps at feature resolution (``make_caf_fn(..., upsample=False)``) and
compute that MSE there, through the Gram matrices of bilinear interpolation: the same number,
without ever building the upsampled [B, H, W, C] maps.
"""

import functools
from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from cafd_jax.models import taps

CAF_KINDS = ("weighted_features", "cam", "features")
CLASS_SOURCES = ("prediction", "label")
WEIGHT_METHODS = ("cam", "gradcam", "gradcampp")
_EPS = 1e-8

CafFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def class_weights(kernel: jnp.ndarray, classes: jnp.ndarray) -> jnp.ndarray:
  """Dense weights of each example's class: kernel [C, K], classes [B] -> [B, C]."""
  chex.assert_rank(kernel, 2)
  chex.assert_rank(classes, 1)
  return jnp.take(kernel, classes, axis=1).T


def gradcam_weights(gradients: jnp.ndarray) -> jnp.ndarray:
  """Grad-CAM: spatial mean of d logit_y / d features, [B, h, w, C] -> [B, C]."""
  chex.assert_rank(gradients, 4)
  return jnp.mean(gradients, axis=(1, 2))


def gradcampp_weights(features: jnp.ndarray, gradients: jnp.ndarray) -> jnp.ndarray:
  """Grad-CAM++ closed form: sum_ij alpha_ij ReLU(g_ij), [B, h, w, C] -> [B, C]."""
  chex.assert_rank(features, 4)
  chex.assert_equal_shape([features, gradients])
  squared = gradients**2
  denominator = 2 * squared + jnp.sum(features, axis=(1, 2), keepdims=True) * squared * gradients
  defined = (gradients != 0) & (jnp.abs(denominator) > _EPS)
  alpha = jnp.where(defined, squared / jnp.where(defined, denominator, 1.0), 0.0)
  return jnp.sum(alpha * jax.nn.relu(gradients), axis=(1, 2))


def _min_max(maps: jnp.ndarray) -> jnp.ndarray:
  """Per-image min-max normalisation to [0, 1]."""
  axes = tuple(range(1, maps.ndim))
  low = jnp.min(maps, axis=axes, keepdims=True)
  high = jnp.max(maps, axis=axes, keepdims=True)
  return (maps - low) / (high - low + _EPS)


def _upsample(maps: jnp.ndarray, output_size: tuple[int, int] | None) -> jnp.ndarray:
  """Bilinear resize of [B, h, w, ...] maps to [B, H, W, ...] (half-pixel centres); ``None``
  keeps the maps as they are."""
  if output_size is None or tuple(maps.shape[1:3]) == tuple(output_size):
    return maps
  return jax.image.resize(maps, (maps.shape[0], *output_size, *maps.shape[3:]), method="bilinear")


@functools.lru_cache(maxsize=None)
def _interpolation_gram(size: int, output_size: int) -> np.ndarray:
  """U^T U for the [output_size, size] matrix U of ``_upsample`` along one axis."""
  with jax.ensure_compile_time_eval():
    upsample = np.asarray(jax.image.resize(jnp.eye(size, dtype=jnp.float32), (output_size, size),
                                           method="bilinear"), np.float64)
  return (upsample.T @ upsample).astype(np.float32)


def caf_distance(a: jnp.ndarray, b: jnp.ndarray, output_size: tuple[int, int]) -> jnp.ndarray:
  """Per-example MSE between CAFs [B, h, w(, C)] bilinearly upsampled to ``output_size``: [B].

  Upsampling is linear and separable, U = U_h (x) U_w, so sum((U d)^2) = d^T (U_h^T U_h (x)
  U_w^T U_w) d for d = a - b: computed at h x w with two small Gram matrices, equal (to float
  rounding) to ``mean((upsample(a) - upsample(b))**2)`` and cheap for any map size.
  """
  chex.assert_equal_shape([a, b])
  chex.assert_rank(a, {3, 4})
  diff = (a - b).astype(jnp.float32)
  diff = diff[..., None] if diff.ndim == 3 else diff
  height, width = output_size
  if diff.shape[1:3] == (height, width):  # already at the output size
    return jnp.mean(diff * diff, axis=(1, 2, 3))
  smoothed = jnp.einsum("ik,bklc->bilc", _interpolation_gram(diff.shape[1], height), diff)
  smoothed = jnp.einsum("jl,bilc->bijc", _interpolation_gram(diff.shape[2], width), smoothed)
  return jnp.sum(diff * smoothed, axis=(1, 2, 3)) / (height * width * diff.shape[3])


def class_activation_map(features: jnp.ndarray, weights: jnp.ndarray,
                         output_size: tuple[int, int] | None) -> jnp.ndarray:
  """ReLU(features . weights), min-max normalised per image, upsampled: [B, H, W]."""
  chex.assert_rank(features, 4)
  chex.assert_equal_shape([features[:, 0, 0, :], weights])
  cam = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", features, weights))
  return _upsample(_min_max(cam), output_size)


def weighted_feature_maps(features: jnp.ndarray, weights: jnp.ndarray,
                          output_size: tuple[int, int] | None) -> jnp.ndarray:
  """ReLU(features * weights) per channel, min-max normalised per image, upsampled."""
  chex.assert_rank(features, 4)
  chex.assert_equal_shape([features[:, 0, 0, :], weights])
  caf = jax.nn.relu(features * weights[:, None, None, :])
  return _upsample(_min_max(caf), output_size)


def class_activation_features(features: jnp.ndarray, weights: jnp.ndarray | None, kind: str,
                              output_size: tuple[int, int] | None) -> jnp.ndarray:
  """The CAF of ``kind`` given per-example class weights [B, C] (unused for ``features``),
  upsampled to ``output_size`` (``None``: left at the features' resolution)."""
  if kind == "features":
    return _upsample(features, output_size)
  if kind == "weighted_features":
    return weighted_feature_maps(features, weights, output_size)
  if kind == "cam":
    return class_activation_map(features, weights, output_size)
  raise ValueError(f"caf kind must be one of {CAF_KINDS}, got {kind!r}.")


def _check_options(kind: str, class_source: str, weights: str) -> None:
  if kind not in CAF_KINDS:
    raise ValueError(f"caf kind must be one of {CAF_KINDS}, got {kind!r}.")
  if class_source not in CLASS_SOURCES:
    raise ValueError(f"caf.class_source must be one of {CLASS_SOURCES}, got {class_source!r}.")
  if weights not in WEIGHT_METHODS:
    raise ValueError(f"caf.weights must be one of {WEIGHT_METHODS}, got {weights!r}.")


def make_caf_fn(tapped_apply: taps.TappedApply, kind: str, class_source: str = "prediction",
                weights: str = "cam", head_kernel: jnp.ndarray | None = None,
                upsample: bool = True) -> CafFn:
  """Builds ``caf(images, labels)`` from ``tapped_apply(images, perturbation) -> (logits,
  features)`` (see ``models.taps``); ``head_kernel`` [C, K] gives the CAM weights. Maps come
  at the input size, or with ``upsample=False`` at the features' (for ``caf_distance``)."""
  _check_options(kind, class_source, weights)
  if kind != "features" and weights == "cam" and head_kernel is None:
    raise ValueError("caf.weights=cam needs the dense kernel of a GAP + dense head; "
                     "use caf.weights=gradcam or gradcampp for other classifiers.")

  def classes_of(logits, labels):
    classes = labels if class_source == "label" else jnp.argmax(logits, axis=-1)
    return jax.lax.stop_gradient(classes)

  def caf(images: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    chex.assert_rank(images, 4)
    output_size = images.shape[1:3] if upsample else None
    if kind == "features" or weights == "cam":
      logits, features = tapped_apply(images, None)
      example_weights = None if kind == "features" else class_weights(
          head_kernel, classes_of(logits, labels))
      return class_activation_features(features, example_weights, kind, output_size)
    feature_shape = jax.eval_shape(lambda x: tapped_apply(x, None), images)[1]
    (logits, features), pullback = jax.vjp(
        lambda perturbation: tapped_apply(images, perturbation),
        jnp.zeros(feature_shape.shape, feature_shape.dtype))
    scores = jax.nn.one_hot(classes_of(logits, labels), logits.shape[-1], dtype=logits.dtype)
    (gradients,) = pullback((scores, jnp.zeros_like(features)))  # d logit_y / d features
    example_weights = (gradcam_weights(gradients) if weights == "gradcam"
                       else gradcampp_weights(features, gradients))
    return class_activation_features(features, example_weights, kind, output_size)

  return caf
