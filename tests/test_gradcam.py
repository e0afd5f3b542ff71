"""Grad-CAM and Grad-CAM++ class weights, feature taps, and the steps that use them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafd_jax import attacks, cam, models
from cafd_jax.models import taps
from cafd_jax.train import denoiser as denoiser_train


def _classifier(head: str, seed: int = 0):
  model = models.create_classifier("vgg_tiny", num_classes=5, width=0.25, head=head)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))
  return model, variables


def _logit_gradients(model, variables, images, classes, layer=taps.DEFAULT_LAYER):
  """d logit_y / d features by jax.grad through a zero perturbation of the tapped layer."""
  _, features = taps.apply_tapped(model, variables, images, layer)

  def score(perturbation):
    logits, _ = taps.apply_tapped(model, variables, images, layer, perturbation)
    return jnp.sum(jnp.take_along_axis(logits, classes[:, None], axis=1))

  return features, jax.grad(score)(jnp.zeros_like(features))


@pytest.fixture(scope="module")
def images():
  return jax.random.uniform(jax.random.key(7), (4, 32, 32, 3))


def test_head_input_tap_is_the_returned_features(images):
  model, variables = _classifier("gap_dense")
  logits, features = taps.apply_tapped(model, variables, images, taps.DEFAULT_LAYER)
  want_logits, want_features = model.apply(variables, images, return_features=True)
  np.testing.assert_array_equal(features, want_features)
  np.testing.assert_array_equal(logits, want_logits)
  paths = taps.module_paths(model, variables, images)
  assert paths[0] == "Conv3x3_0" and "head" in paths and "head/dense" in paths


def test_bad_or_missing_layer_is_one_clear_line(images):
  model, variables = _classifier("gap_dense")
  with pytest.raises(ValueError, match="MODULE_PATH:input"):
    taps.parse_layer("head:weights")
  with pytest.raises(ValueError, match="called 0 times") as error:
    taps.apply_tapped(model, variables, images, "Conv3x3_99")
  assert "\n" not in str(error.value)


def test_gradcam_weights_are_cam_weights_over_map_area_for_gap_dense(images):
  model, variables = _classifier("gap_dense")
  classes = jnp.array([0, 1, 4, 2])
  features, gradients = _logit_gradients(model, variables, images, classes)
  area = features.shape[1] * features.shape[2]
  kernel = models.head_kernel(variables["params"])
  np.testing.assert_allclose(cam.gradcam_weights(gradients) * area,
                             cam.class_weights(kernel, classes), rtol=1e-5, atol=1e-6)
  for kind in ("cam", "weighted_features"):  # positive per-class scale: same normalised maps
    by_cam, by_gradcam = (
        denoiser_train.classifier_caf_fn(model, variables, kind, "label", weights)(images, classes)
        for weights in ("cam", "gradcam"))
    np.testing.assert_allclose(by_gradcam, by_cam, atol=1e-5)


def _gradcampp_numpy(features: np.ndarray, gradients: np.ndarray) -> np.ndarray:
  squared = gradients**2
  denominator = 2 * squared + features.sum(axis=(1, 2), keepdims=True) * squared * gradients
  alpha = np.where(gradients != 0, squared / np.where(gradients != 0, denominator, 1.0), 0.0)
  return (alpha * np.maximum(gradients, 0)).sum(axis=(1, 2))


def test_gradcampp_matches_numpy_closed_form_on_an_mlp_head(images):
  """Flatten + dense + ReLU + dense head: NumPy differentiates it by hand."""
  model, variables = _classifier("flatten_mlp", seed=3)
  classes = jnp.array([3, 0, 2, 2])
  _, features = taps.apply_tapped(model, variables, images, taps.DEFAULT_LAYER)
  features = np.asarray(features, np.float64)
  head = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"]["head"])
  flat = features.reshape(len(features), -1)
  active = (flat @ head["hidden"]["kernel"] + head["hidden"]["bias"]) > 0
  output_rows = head["output"]["kernel"][:, np.asarray(classes)].T  # [B, hidden]
  gradients = ((active * output_rows) @ head["hidden"]["kernel"].T).reshape(features.shape)
  weights = _gradcampp_numpy(features, gradients)
  expected = np.maximum(np.einsum("bhwc,bc->bhw", features, weights), 0)
  low, high = expected.min(axis=(1, 2), keepdims=True), expected.max(axis=(1, 2), keepdims=True)
  expected = (expected - low) / (high - low + 1e-8)

  _, jax_gradients = _logit_gradients(model, variables, images, classes)
  np.testing.assert_allclose(jax_gradients, gradients, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(cam.gradcampp_weights(jnp.asarray(features, jnp.float32),
                                                   jnp.asarray(gradients, jnp.float32)),
                             weights, rtol=1e-3, atol=1e-6)  # float32 against float64
  caf_fn = denoiser_train.classifier_caf_fn(model, variables, "cam", "label", "gradcampp")
  got = caf_fn(images, classes)  # upsampled as tests/test_cam.py checks against NumPy
  small = jax.image.resize(jnp.asarray(expected, jnp.float32), (4, 32, 32), "bilinear")
  np.testing.assert_allclose(got, small, atol=1e-4)


def test_cam_weights_refuse_an_mlp_head_and_other_layers():
  model, variables = _classifier("flatten_mlp")
  with pytest.raises(ValueError, match="gradcam"):
    denoiser_train.classifier_caf_fn(model, variables, "cam", "label", "cam")
  model, variables = _classifier("gap_dense")
  with pytest.raises(ValueError, match="gradcam"):
    denoiser_train.classifier_caf_fn(model, variables, "cam", "label", "cam", "Conv3x3_2")


@pytest.mark.parametrize("weights, head, layer", [  # cam: tests/test_train.py, test_attacks.py
    ("gradcam", "flatten_mlp", taps.DEFAULT_LAYER),
    ("gradcampp", "gap_dense", "Conv3x3_2:input"),  # an earlier layer: 8x8 maps, 16 channels
])
def test_attack_and_denoiser_steps_run_with_each_weight_method(images, weights, head, layer):
  model, variables = _classifier(head)
  labels = jnp.array([0, 1, 2, 3])
  caf_fn = denoiser_train.classifier_caf_fn(model, variables, "weighted_features", "prediction",
                                            weights, layer)
  attack = jax.jit(lambda x, y, key: attacks.caf_attack(caf_fn, x, y, key, eps=8 / 255,
                                                        step_size=2 / 255, steps=2))
  x_adv = attack(images, labels, jax.random.key(0))
  assert 0 < float(jnp.max(jnp.abs(x_adv - images))) <= 8 / 255 + 1e-6
  distance = jnp.mean((caf_fn(x_adv, labels) - caf_fn(images, labels)) ** 2)
  assert float(distance) > 0  # the attack moved the CAF

  from configs import tiny  # pylint: disable=g-import-not-at-top
  from cafd_jax import factory  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  states = factory.denoiser_states(config, jax.random.key(1), 10)
  step = denoiser_train.make_train_step(model, caf_kind="weighted_features",
                                        class_source="label", caf_weight=1e3, gan_weight=5e-3,
                                        weights=weights, feature_layer=layer)
  before = [np.asarray(leaf).copy() for leaf in jax.tree.leaves(states[0].params)]
  states, metrics = step(states, variables, x_adv, images, labels)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["caf_loss"]) > 0
  after = jax.tree.leaves(states[0].params)
  assert any(not np.allclose(new, old) for new, old in zip(after, before))
