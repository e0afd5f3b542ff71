"""Input-transform defenses (baselines): bit-depth reduction, median filter, JPEG.

Each maps pixels in [0, 1], NHWC, to pixels in [0, 1]. Bit-depth reduction and JPEG have zero
or no gradient, so adaptive attacks reach through them with BPDA (``attacks.wrappers``).
"""

import io

import chex
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image


def bit_depth(x: jnp.ndarray, bits: int = 5) -> jnp.ndarray:
  """Rounds each pixel to ``bits`` bits (Xu et al. 2018 use 5 bits on CIFAR-10)."""
  if not 1 <= bits <= 8:
    raise ValueError(f"bit_depth: bits must be in 1..8, got {bits}")
  levels = 2 ** bits - 1
  return jnp.round(x * levels) / levels


def median_filter(x: jnp.ndarray, size: int = 2) -> jnp.ndarray:
  """Per-channel median over a size x size window, edges reflected (Xu et al.: 2x2 on CIFAR).

  An even window is anchored like scipy.ndimage.median_filter (one more pixel before than
  after the centre). Differentiable almost everywhere (the median selects one input pixel).
  """
  chex.assert_rank(x, 4)
  if size < 1:
    raise ValueError(f"median_filter: size must be >= 1, got {size}")
  before, after = size // 2, (size - 1) // 2
  padded = jnp.pad(x, ((0, 0), (before, after), (before, after), (0, 0)), mode="symmetric")
  height, width = x.shape[1], x.shape[2]
  windows = [padded[:, i:i + height, j:j + width, :] for i in range(size) for j in range(size)]
  stacked = jnp.sort(jnp.stack(windows, axis=-1), axis=-1)
  # Rank count // 2: the middle value, or for an even count the upper middle one, as scipy.
  return stacked[..., (size * size) // 2]


def _jpeg_numpy(x: np.ndarray, quality: int) -> np.ndarray:
  out = np.empty_like(x)
  for index, image in enumerate(np.asarray(x)):
    buffer = io.BytesIO()
    pixels = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    out[index] = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255.0
  return out


def jpeg(x: jnp.ndarray, quality: int = 75) -> jnp.ndarray:
  """JPEG compression and decompression at ``quality`` (Das et al. 2017; Guo et al. 2018: 75).

  Runs PIL on the host through ``jax.pure_callback``, so it works inside jit but has no
  gradient: attack it with BPDA.
  """
  chex.assert_rank(x, 4)
  if not 1 <= quality <= 95:
    raise ValueError(f"jpeg: quality must be in 1..95, got {quality}")
  if x.shape[-1] != 3:
    raise ValueError(f"jpeg: expects RGB images (last axis 3), got shape {x.shape}")
  result = jax.ShapeDtypeStruct(x.shape, jnp.float32)
  return jax.pure_callback(lambda a: _jpeg_numpy(a, quality), result, x.astype(jnp.float32),
                           vmap_method="sequential")


TRANSFORMS = {"bit_depth": bit_depth, "median": median_filter, "jpeg": jpeg}
DIFFERENTIABLE = {"bit_depth": False, "median": True, "jpeg": False}
