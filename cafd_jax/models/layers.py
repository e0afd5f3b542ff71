"""Convolutions that are fast on XLA:CPU, with the parameters and results of ``nn.Conv``.

Two XLA:CPU weak spots, each replaced by an equivalent computation on CPU only (GPU/TPU run
``lax.conv_general_dilated`` unchanged):

* Tiny maps (VGG-19's 2x2 block, ResNet's 4x4 stage on 32x32 inputs): a convolution is ~40x
  slower than the same arithmetic as one matrix product. ``conv_general_dilated`` (a drop-in
  for ``nn.Conv(conv_general_dilated=...)``) gathers the kh*kw shifted windows of the padded
  input into patches [B, H', W', kh*kw*C] and multiplies them by the kernel [kh*kw*C, O]; its
  gradients are slices, pads and matrix products too.
* Large maps with few channels (32x32, 16 channels): the kernel gradient of a stride-1
  convolution is 10-20x slower than the forward pass. ``Conv3x3`` computes that gradient as
  nine shifted matrix products instead (3-4x faster, same values).

``Conv3x3`` parameters are named and shaped as in ``nn.Conv`` (kernel [3, 3, in, out], bias
[out]).
"""

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
_MIN_FAST_PIXELS = 32 * 32  # below this XLA's own kernel gradient is as fast or faster
MAX_MATMUL_PIXELS = 4 * 4  # output maps up to this size run as patches x kernel on CPU


def _shifted_windows(padded, kernel_h: int, kernel_w: int, strides, out_h: int, out_w: int):
  """The input window under each kernel tap (row-major), [B, out_h, out_w, C] each."""
  return [padded[:, row:row + strides[0] * (out_h - 1) + 1:strides[0],
                 col:col + strides[1] * (out_w - 1) + 1:strides[1], :]
          for row in range(kernel_h) for col in range(kernel_w)]


def _as_matmul(x, kernel, strides, padding):
  """A NHWC x HWIO convolution as shifted windows of the padded input times the kernel."""
  (pad_top, pad_bottom), (pad_left, pad_right) = padding
  padded = jnp.pad(x, ((0, 0), (pad_top, pad_bottom), (pad_left, pad_right), (0, 0)))
  kernel_h, kernel_w, in_features, out_features = kernel.shape
  out_h = (padded.shape[1] - kernel_h) // strides[0] + 1
  out_w = (padded.shape[2] - kernel_w) // strides[1] + 1
  windows = _shifted_windows(padded, kernel_h, kernel_w, strides, out_h, out_w)
  patches = windows[0] if len(windows) == 1 else jnp.concatenate(windows, axis=-1)
  return jnp.einsum("bhwk,ko->bhwo", patches,
                    kernel.reshape(kernel_h * kernel_w * in_features, out_features))


def _padding_pairs(padding, kernel_shape) -> tuple | None:
  if isinstance(padding, str):
    if padding == "VALID":
      return ((0, 0), (0, 0))
    if padding == "SAME" and all(size % 2 for size in kernel_shape):
      return tuple((size // 2, size // 2) for size in kernel_shape)
    return None
  return tuple(tuple(pair) for pair in padding)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """``lax.conv_general_dilated``, computed as one matrix product on CPU for tiny NHWC maps.

  Pass as ``nn.Conv(..., conv_general_dilated=layers.conv_general_dilated)``: same parameters,
  same results (to float rounding), any backend.
  """
  def plain():
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        precision=precision, **kwargs)

  pairs = _padding_pairs(padding, rhs.shape[:2])
  dilated = any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
  nhwc = dimension_numbers is None or jax.lax.conv_dimension_numbers(
      lhs.shape, rhs.shape, dimension_numbers) == jax.lax.conv_dimension_numbers(
          lhs.shape, rhs.shape, _DIMENSIONS)
  if (jax.default_backend() != "cpu" or lhs.ndim != 4 or pairs is None or dilated or not nhwc
      or feature_group_count != 1 or kwargs):
    return plain()
  out_h = (lhs.shape[1] + sum(pairs[0]) - rhs.shape[0]) // window_strides[0] + 1
  out_w = (lhs.shape[2] + sum(pairs[1]) - rhs.shape[1]) // window_strides[1] + 1
  if out_h * out_w > MAX_MATMUL_PIXELS:
    return plain()
  return _as_matmul(lhs, rhs, tuple(window_strides), pairs)


def _conv(x, kernel, strides):
  return jax.lax.conv_general_dilated(x, kernel, (strides, strides), ((1, 1), (1, 1)),
                                      dimension_numbers=_DIMENSIONS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_shifted_kernel_grad(x, kernel, strides):
  return _conv(x, kernel, strides)


def _forward(x, kernel, strides):
  return _conv(x, kernel, strides), (x, kernel)


def _backward(strides, residuals, grad_out):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda z: _conv(z, kernel, strides), x)
  (grad_x,) = input_vjp(grad_out)
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  windows = _shifted_windows(padded, 3, 3, (strides, strides), *grad_out.shape[1:3])
  taps = [jnp.einsum("bhwc,bhwd->cd", window, grad_out) for window in windows]
  grad_kernel = jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)
  return grad_x, grad_kernel


_conv_shifted_kernel_grad.defvjp(_forward, _backward)


def conv(*args, **kwargs) -> nn.Conv:
  """``nn.Conv`` (same name, parameters and results) whose tiny-map convolutions are matrix
  products on CPU (``conv_general_dilated``)."""
  return nn.Conv(*args, conv_general_dilated=conv_general_dilated, **kwargs)


class Conv3x3(nn.Module):
  """3x3 convolution, padding 1, with bias; parameters as ``nn.Conv``."""

  features: int
  strides: int = 1
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if (jax.default_backend() == "cpu" and self.strides == 1
        and x.shape[1] * x.shape[2] >= _MIN_FAST_PIXELS):
      y = _conv_shifted_kernel_grad(x, kernel, self.strides)
    else:  # tiny maps become one matrix product on CPU
      y = conv_general_dilated(x, kernel, (self.strides, self.strides), ((1, 1), (1, 1)),
                               dimension_numbers=_DIMENSIONS)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y
