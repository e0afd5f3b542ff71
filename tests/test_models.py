"""Shapes of every model in the zoo, features on request, denoiser output range."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from cafd_jax import models
from cafd_jax.models import layers
from conftest import assert_in_box

# name -> (width, expected feature map [h, w, C]) on a 32x32 input
CLASSIFIER_CASES = {
    "vgg_tiny": (0.25, (8, 8, 32)),
    "vgg11": (0.125, (2, 2, 64)),
    "vgg13": (0.125, (2, 2, 64)),
    "vgg16": (0.125, (2, 2, 64)),
    "vgg19": (0.125, (2, 2, 64)),
    "vgg11_ref": (0.125, (1, 1, 64)),  # the reference's trailing pool: a 1x1 map
    "vgg13_ref": (0.125, (1, 1, 64)),
    "vgg16_ref": (0.125, (1, 1, 64)),
    "vgg19_ref": (0.125, (1, 1, 64)),
    "resnet18": (0.125, (4, 4, 64)),
    "resnet34": (0.125, (4, 4, 64)),
    "resnet50": (0.125, (4, 4, 256)),
    "wrn": (0.1, (8, 8, 64)),
    "airbench93": (0.25, (3, 3, 32)),  # airbench's maps: 31 -> 15 -> 7 -> 3
    "airbench94": (0.125, (3, 3, 32)),
}


def test_every_registered_classifier_is_covered():
  assert set(CLASSIFIER_CASES) == set(models.CLASSIFIERS)


@pytest.mark.parametrize("name", sorted(CLASSIFIER_CASES))
def test_classifier_shapes(name):
  width, feature_shape = CLASSIFIER_CASES[name]
  model = models.create_classifier(name, num_classes=7, width=width)
  x = jax.random.uniform(jax.random.key(0), (3, 32, 32, 3))
  variables = model.init(jax.random.key(1), x)
  logits = model.apply(variables, x)
  logits_again, features = model.apply(variables, x, return_features=True)
  assert logits.shape == (3, 7)
  assert features.shape == (3, *feature_shape)
  np.testing.assert_allclose(logits, logits_again, rtol=1e-6)
  kernel = models.head_kernel(variables["params"])
  assert kernel.shape == (feature_shape[-1], 7)
  # The head is GAP + dense: logits are recoverable from features, the premise of CAM.
  bias = variables["params"]["head"]["dense"]["bias"]
  np.testing.assert_allclose(jnp.mean(features, axis=(1, 2)) @ kernel + bias, logits,
                             rtol=1e-4, atol=1e-4)
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


def test_wide_resnet_rejects_bad_depth():
  model = models.create_classifier("wrn", num_classes=10, depth=27, width=0.1)
  with pytest.raises(ValueError, match="6n\\+4"):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_unet_full_width_layout_and_output_range():
  denoiser = models.UNetDenoiser()
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  variables = jax.eval_shape(denoiser.init, jax.random.key(1), x)
  params = variables["params"]
  encoder_out = [params[f"ConvBlocks_{i}"][f"Conv3x3_{n - 1}"]["kernel"].shape[-1]
                 for i, n in enumerate((2, 3, 3, 3, 3))]
  decoder_out = [params[f"ConvBlocks_{5 + i}"][f"Conv3x3_{n - 1}"]["kernel"].shape[-1]
                 for i, n in enumerate((3, 3, 3, 2))]
  assert encoder_out == [64, 128, 256, 256, 256]
  assert decoder_out == [256, 256, 128, 64]
  assert params["ConvBlocks_5"]["Conv3x3_0"]["kernel"].shape[2] == 512  # 256 up + 256 skip
  assert params["noise"]["kernel"].shape == (1, 1, 64, 3)


def test_unet_small_width_runs_and_clips():
  denoiser = models.UNetDenoiser(width=0.125)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  variables = denoiser.init(jax.random.key(1), x)
  out = denoiser.apply(variables, x)
  assert out.shape == x.shape
  assert_in_box(out)


def test_discriminator_gives_one_logit_per_image():
  disc = models.Discriminator(width=0.25)
  x = jnp.zeros((4, 32, 32, 3))
  variables = disc.init(jax.random.key(0), x)
  assert disc.apply(variables, x).shape == (4,)


def _conv_case(batch, spatial, kernel_size, strides, padding, features=(5, 6)):
  """Random NHWC input and HWIO kernel (``features`` = in, out), ``apply(conv, x, kernel)`` with
  these settings, and the jaxpr of ``layers.conv_general_dilated`` on them (its CPU path, on
  CPU)."""
  x = jax.random.normal(jax.random.key(0), (batch, spatial, spatial, features[0]))
  kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, *features))

  def apply(conv, x, kernel):
    return conv(x, kernel, (strides, strides), padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"))

  jaxpr = str(jax.make_jaxpr(functools.partial(apply, layers.conv_general_dilated))(x, kernel))
  return x, kernel, apply, jaxpr


@pytest.mark.parametrize("spatial, strides, padding, kernel_size", [
    (2, 1, ((1, 1), (1, 1)), 3),  # VGG-19's last block on 32x32 inputs
    (1, 1, "SAME", 3),
    (4, 2, ((1, 1), (1, 1)), 3),  # a ResNet downsampling conv
    (4, 2, "VALID", 1),  # a ResNet 1x1 shortcut
])
def test_tiny_map_convolution_as_matmul_matches_lax(spatial, strides, padding, kernel_size):
  x, kernel, apply, cpu_jaxpr = _conv_case(3, spatial, kernel_size, strides, padding)

  def loss(conv, x, kernel):
    y = apply(conv, x, kernel)
    return jnp.sum(jnp.sin(y)), y

  (_, want), want_grads = jax.value_and_grad(
      functools.partial(loss, jax.lax.conv_general_dilated), (0, 1), has_aux=True)(x, kernel)
  (_, got), got_grads = jax.value_and_grad(
      functools.partial(loss, layers.conv_general_dilated), (0, 1), has_aux=True)(x, kernel)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for got_grad, want_grad in zip(got_grads, want_grads):
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-5)
  if jax.default_backend() == "cpu":  # the CPU path really is the matrix product
    assert "conv_general_dilated" not in cpu_jaxpr and "dot_general" in cpu_jaxpr


_WIDE_INPUT = (12, 5)  # in >= 2 * out, as the U-Net decoder's convolutions after a skip concat


@pytest.mark.parametrize("spatial, strides, padding, kernel_size, features", [
    (8, 1, ((1, 1), (1, 1)), 3, (5, 6)),  # VGG / U-Net / ResNet 3x3 convolution
    (4, 1, ((1, 1), (1, 1)), 3, (5, 6)),  # 4x4: VGG-19's fourth block, ResNet's last stage
    (9, 1, ((0, 2), (1, 0)), 3, (5, 6)),  # unit strides, uneven padding: flipped-kernel input grad
    (8, 1, "VALID", 1, (5, 6)),  # a ResNet-50 bottleneck 1x1 convolution
    (16, 2, "SAME", 3, (5, 6)),  # a downsampling conv: 8x8 output
    (17, 2, ((0, 1), (2, 0)), 3, (5, 6)),  # odd size, uneven padding
    (16, 2, "VALID", 1, (5, 6)),  # a ResNet 1x1 shortcut
    (16, 1, ((1, 1), (1, 1)), 3, _WIDE_INPUT),  # a U-Net decoder conv after the skip concat
])
def test_large_map_gradients_match_lax(spatial, strides, padding, kernel_size, features):
  x, kernel, apply, cpu_jaxpr = _conv_case(2, spatial, kernel_size, strides, padding, features)

  def loss(conv, x, kernel):
    return jnp.sum(jnp.sin(apply(conv, x, kernel)))

  def input_gradient_norm(conv, x, kernel):  # second order, as Grad-CAM attacks need
    return jnp.sum(jax.grad(loss, 1)(conv, x, kernel) ** 2)

  for objective in (loss, input_gradient_norm):
    want = jax.grad(functools.partial(objective, jax.lax.conv_general_dilated), (0, 1))(x, kernel)
    got = jax.grad(functools.partial(objective, layers.conv_general_dilated), (0, 1))(x, kernel)
    for got_grad, want_grad in zip(got, want):
      np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-4)
  if jax.default_backend() == "cpu":  # the CPU path really is the custom gradient, whose
    assert "custom_vjp" in cpu_jaxpr  # kernel gradient reads x through a conditional
    kernel_grad = jax.make_jaxpr(jax.grad(functools.partial(loss, layers.conv_general_dilated),
                                          1))(x, kernel)
    assert "cond[" in str(kernel_grad)


@pytest.mark.parametrize("shape", [(3, 8, 8, 5), (2, 4, 6, 3), (2, 5, 4, 3)])
def test_max_pool_matches_flax_on_ties_to_second_order(shape):
  """Integer-valued inputs tie often: the gradient must go to the first maximum of a window, as
  nn.max_pool's does (odd sizes take nn.max_pool itself)."""
  keys = jax.random.split(jax.random.key(0), 2)
  x = jax.random.randint(keys[0], shape, 0, 3).astype(jnp.float32)
  weights = jax.random.normal(keys[1], (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
  flax_pool = lambda z: nn.max_pool(z, (2, 2), strides=(2, 2))

  def loss(pool, z):
    return jnp.sum(jnp.sin(pool(z)) * weights)

  def input_gradient_norm(pool, z):
    return jnp.sum(jax.grad(functools.partial(loss, pool))(z * z) ** 2)

  np.testing.assert_array_equal(layers.max_pool_2x2(x), flax_pool(x))
  for objective in (loss, input_gradient_norm):
    got = jax.grad(functools.partial(objective, layers.max_pool_2x2))(x)
    want = jax.grad(functools.partial(objective, flax_pool))(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  if jax.default_backend() == "cpu" and shape[1] % 2 == 0:
    assert "reduce_window" not in str(jax.make_jaxpr(jax.grad(
        functools.partial(loss, layers.max_pool_2x2)))(x))


def test_resnet_parameter_names_are_those_of_nn_conv():
  model = models.create_classifier("resnet18", num_classes=10, width=0.125)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  assert "Conv_0" in params and set(params["BasicBlock_0"]) >= {"Conv_0", "Conv_1"}
