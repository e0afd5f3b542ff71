"""Convolutions and pooling that are fast on XLA:CPU, with the parameters and results of Flax's.

XLA:CPU weak spots, each replaced by an equivalent computation on CPU only (GPU/TPU run
``lax.conv_general_dilated`` and ``nn.max_pool`` unchanged):

* Tiny maps (VGG-19's 2x2 block on 32x32 inputs; any output of at most 2x2): the input
  gradient of a convolution is ~40x slower than the same arithmetic as one matrix product
  (2x2, 512 -> 512, batch 128: 1.8 s against 47 ms for forward and both gradients).
  ``conv_general_dilated`` gathers the kh*kw shifted windows of the padded input into patches
  [B, H', W', kh*kw*C] and multiplies them by the kernel [kh*kw*C, O]; its gradients are
  slices, pads and matrix products too.
* Larger maps, inside loops (every attack iteration): XLA:CPU ran the transposed input
  gradient that autodiff emits about 2x slower than a forward convolution (a 4-iteration
  VGG-19 CAF attack: 20 s against 9 s). The input gradient is written instead (unit strides)
  as a forward convolution of the output gradient with the flipped, transposed kernel; the
  forward pass and the kernel gradient stay XLA's.
* Max pooling (VGG): the gradient of ``nn.max_pool`` (select-and-scatter over packed values
  and indices) took 208 ms (forward and gradient) for a [128, 32, 32, 64] map on 2 cores;
  ``max_pool_2x2`` writes it as element-wise masks of the window's first maximum (63 ms), same
  values and gradients.
* Kernel gradients: XLA:CPU transposes the convolution's input channels-first for them, and
  recomputed the input's batch norm and ReLU inside that transpose (``_materialized``).

``cafd_jax.cpu_flags`` gives all these convolutions to XLA's own convolution rather than
YNNPACK (2x faster on 32x32 maps); with it, XLA's kernel gradient is also faster than the
matrix-product forms this module used before (docs/benchmarks.md has the measurements).

``conv_general_dilated`` is a drop-in for ``nn.Conv(conv_general_dilated=...)``; ``conv()``
builds such an ``nn.Conv``. ``Conv3x3`` parameters are named and shaped as in ``nn.Conv``
(kernel [3, 3, in, out], bias [out]). Every path stays differentiable to any order in reverse
mode (the attacks differentiate through Grad-CAM weights).
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
MAX_MATMUL_PIXELS = 2 * 2  # output maps up to this size run as patches x kernel on CPU


def _windows(padded, row: int, kernel_w: int, strides, out_h: int, out_w: int):
  """The input windows under kernel taps (row, 0..kernel_w-1), [B, out_h, out_w, C] each."""
  rows = padded[:, row:row + strides[0] * (out_h - 1) + 1:strides[0]]
  return [rows[:, :, col:col + strides[1] * (out_w - 1) + 1:strides[1], :]
          for col in range(kernel_w)]


def _row_patches(padded, row: int, kernel_w: int, strides, out_h: int, out_w: int):
  """Windows of one kernel row side by side on the channel axis: [B, out_h, out_w, kw*C]."""
  windows = _windows(padded, row, kernel_w, strides, out_h, out_w)
  return windows[0] if len(windows) == 1 else jnp.concatenate(windows, axis=-1)


def _pad(x, padding):
  (top, bottom), (left, right) = padding
  return jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


def _as_matmul(x, kernel, strides, padding):
  """A NHWC x HWIO convolution as shifted windows of the padded input times the kernel."""
  padded = _pad(x, padding)
  kernel_h, kernel_w, in_features, out_features = kernel.shape
  out_h = (padded.shape[1] - kernel_h) // strides[0] + 1
  out_w = (padded.shape[2] - kernel_w) // strides[1] + 1
  patches = jnp.concatenate(
      [_row_patches(padded, row, kernel_w, strides, out_h, out_w) for row in range(kernel_h)],
      axis=-1)
  return jnp.einsum("bhwk,ko->bhwo", patches,
                    kernel.reshape(kernel_h * kernel_w * in_features, out_features))


def _xla_conv(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DIMENSIONS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_forward_input_grad(x, kernel, strides, padding):
  return _xla_conv(x, kernel, strides, padding)


def _forward(x, kernel, strides, padding):
  return _xla_conv(x, kernel, strides, padding), (x, kernel)


def _input_grad(x, kernel, strides, padding, grad_out):
  """d(sum(conv(x, k) * grad_out))/dx.

  With unit strides this is written as a forward convolution of ``grad_out`` with the kernel
  flipped in space and transposed to [kh, kw, out, in]: XLA:CPU runs that form fast wherever
  it appears, whereas it ran the transposed form that autodiff emits about 2x slower inside
  loops (the attacks' iterations).
  """
  kernel_h, kernel_w = kernel.shape[:2]
  (top, bottom), (left, right) = padding
  if tuple(strides) != (1, 1) or min(top, bottom, left, right) < 0 or max(
      top, bottom) > kernel_h - 1 or max(left, right) > kernel_w - 1:
    _, input_vjp = jax.vjp(lambda z: _xla_conv(z, kernel, strides, padding), x)
    return input_vjp(grad_out)[0]
  flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
  pad = ((kernel_h - 1 - top, kernel_h - 1 - bottom), (kernel_w - 1 - left, kernel_w - 1 - right))
  return _xla_conv(grad_out, flipped, (1, 1), pad)


def _materialized(x, kernel):
  """``x`` as a buffer of its own: an XLA conditional is never fused with its operands or users.

  The kernel gradient's convolution wants ``x`` channels-first, so XLA:CPU transposes it; left
  alone, it fuses ``x``'s element-wise producers (batch norm, ReLU, residual sums) into that
  transpose and recomputes them in the transposed order, 3-7x slower than transposing ``x``
  from memory (ResNet-18 classifier step: 1.76 s of such transposes against 0.41 s).
  ``lax.optimization_barrier`` does not stop this (XLA:CPU removes it before fusion). Both
  branches return ``x``; the predicate reads the kernel (replicated, unlike a batch-sharded
  ``x``) and is false only for a NaN.
  """
  first = kernel.reshape(-1)[0]
  return jax.lax.cond(first == first, lambda value: value, lambda value: value + 0, x)


def _backward(strides, padding, residuals, grad_out):
  x, kernel = residuals
  grad_x = _input_grad(x, kernel, strides, padding, grad_out)
  x = _materialized(x, kernel)
  _, kernel_vjp = jax.vjp(lambda k: _xla_conv(x, k, strides, padding), kernel)  # XLA's own
  return grad_x, kernel_vjp(grad_out)[0]


_conv_forward_input_grad.defvjp(_forward, _backward)


def _padding_pairs(padding, in_shape, kernel_shape, strides) -> tuple:
  if isinstance(padding, str):  # SAME pads unevenly for some strides and sizes
    return tuple(tuple(pair) for pair in jax.lax.padtype_to_pads(in_shape, kernel_shape, strides,
                                                                  padding))
  return tuple(tuple(pair) for pair in padding)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """``lax.conv_general_dilated`` with CPU fast paths for tiny and larger NHWC maps.

  Pass as ``nn.Conv(..., conv_general_dilated=layers.conv_general_dilated)``: same parameters,
  same results (to float rounding), any backend.
  """
  def plain():
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        precision=precision, **kwargs)

  dilated = any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
  nhwc = dimension_numbers is None or jax.lax.conv_dimension_numbers(
      lhs.shape, rhs.shape, dimension_numbers) == jax.lax.conv_dimension_numbers(
          lhs.shape, rhs.shape, _DIMENSIONS)
  if (jax.default_backend() != "cpu" or lhs.ndim != 4 or dilated or not nhwc
      or feature_group_count != 1 or precision is not None or kwargs):
    return plain()
  strides = tuple(window_strides)
  pairs = _padding_pairs(padding, lhs.shape[1:3], rhs.shape[:2], strides)
  out_pixels = (((lhs.shape[1] + sum(pairs[0]) - rhs.shape[0]) // strides[0] + 1)
                * ((lhs.shape[2] + sum(pairs[1]) - rhs.shape[1]) // strides[1] + 1))
  if out_pixels <= MAX_MATMUL_PIXELS:
    return _as_matmul(lhs, rhs, strides, pairs)
  return _conv_forward_input_grad(lhs, rhs, strides, pairs)


def conv(*args, **kwargs) -> nn.Conv:
  """``nn.Conv`` (same name, parameters and results) with the CPU fast paths of
  ``conv_general_dilated``."""
  return nn.Conv(*args, conv_general_dilated=conv_general_dilated, **kwargs)


class Conv3x3(nn.Module):
  """3x3 convolution, padding 1, with bias; parameters as ``nn.Conv``."""

  features: int
  strides: int = 1
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    y = conv_general_dilated(x, kernel, (self.strides, self.strides), ((1, 1), (1, 1)),
                             dimension_numbers=_DIMENSIONS)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


def _window_corners(x):
  """The four taps of each 2x2 window, in row-major window order: [B, H/2, W/2, C] each."""
  return x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]


@jax.custom_vjp
def _max_pool_2x2_first_max(x):
  top_left, top_right, bottom_left, bottom_right = _window_corners(x)
  return jnp.maximum(jnp.maximum(top_left, top_right), jnp.maximum(bottom_left, bottom_right))


def _max_pool_forward(x):
  return _max_pool_2x2_first_max(x), x


def _max_pool_backward(x, grad_out):
  """The whole output gradient to the first maximum of each window in row-major order, as
  XLA's select-and-scatter gives it to ``nn.max_pool``, by element-wise masks.

  The masks compare the corners with one another, never with the saved forward output: XLA
  may recompute ``x`` here from its producers, one rounding apart from the forward's values,
  and an equality test against the forward maximum could then pick no corner or a wrong one.
  """
  top_left, top_right, bottom_left, bottom_right = _window_corners(x)
  masks = (
      (top_left >= top_right) & (top_left >= bottom_left) & (top_left >= bottom_right),
      (top_right > top_left) & (top_right >= bottom_left) & (top_right >= bottom_right),
      (bottom_left > top_left) & (bottom_left > top_right) & (bottom_left >= bottom_right),
      (bottom_right > top_left) & (bottom_right > top_right) & (bottom_right > bottom_left))
  grads = [jnp.where(mask, grad_out, 0) for mask in masks]
  top = jnp.stack(grads[:2], axis=3)  # [B, H/2, W/2, 2, C]
  bottom = jnp.stack(grads[2:], axis=3)
  return (jnp.stack([top, bottom], axis=2).reshape(x.shape),)  # [B, H/2, 2, W/2, 2, C]


_max_pool_2x2_first_max.defvjp(_max_pool_forward, _max_pool_backward)


def max_pool_2x2(x):
  """``nn.max_pool(x, (2, 2), strides=(2, 2))`` with the same values and gradients.

  On CPU, for NHWC inputs of even height and width, as the maximum of the four window corners
  with a custom gradient of element-wise masks: XLA:CPU runs ``nn.max_pool``'s gradient
  (select-and-gather / select-and-scatter over packed values and indices) slowly inside the
  attacks' input gradients.
  """
  if jax.default_backend() != "cpu" or x.ndim != 4 or x.shape[1] % 2 or x.shape[2] % 2:
    return nn.max_pool(x, (2, 2), strides=(2, 2))
  return _max_pool_2x2_first_max(x)
