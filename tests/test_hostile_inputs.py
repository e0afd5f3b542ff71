"""Hostile inputs, generated (hypothesis): data folders, config strings and api arrays each end
in a result, a documented conversion or one clear line; never a traceback or a partial output.

Each test prints the number of cases it ran (``pytest -s``); the counts are fixed by
``max_examples`` below: data files 60, config strings 200, api inputs 80.
"""

import io
import os
import struct
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cafd_jax import api, config_checks, data

_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                        HealthCheck.too_slow])


class _Counter:
  def __init__(self, name):
    self.name, self.cases = name, 0

  def __call__(self):
    self.cases += 1

  def report(self):
    print(f"{self.name}: {self.cases} generated cases")


# --- Data folders ----------------------------------------------------------------------------

def _png(array: np.ndarray, mode: str | None = None) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array, mode).save(buffer, format="PNG")
  return buffer.getvalue()


def _huge_png(side: int = 100_000) -> bytes:
  """A tiny PNG whose header claims side x side pixels (a decompression bomb)."""
  def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
  header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
          + chunk(b"IEND", b""))


def _file_kinds(rng: np.random.Generator) -> dict:
  """name -> (file bytes, expected RGB uint8 image or None if the load must fail)."""
  rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
  grey16 = rng.integers(0, 65536, (32, 32), dtype=np.uint16)
  rgba = np.concatenate([rgb, rng.integers(0, 256, (32, 32, 1), dtype=np.uint8)], -1)
  valid = _png(rgb)
  return {
      "rgb": (valid, rgb),
      "greyscale": (_png(grey), np.repeat(grey[..., None], 3, -1)),
      "rgba": (_png(rgba), rgb),  # documented: alpha dropped
      "sixteen_bit": (_png(grey16),
                      np.repeat(np.round(grey16 / 257.0).astype(np.uint8)[..., None], 3, -1)),
      "wrong_size": (_png(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)), None),
      "truncated": (valid[:len(valid) // 2], None),
      "zero_byte": (b"", None),
      "not_an_image": (b"just some text, not pixels\n" * 3, None),
      "huge": (_huge_png(), None),
  }


@pytest.fixture(scope="module")
def counters():
  made = {}
  yield made
  for counter in made.values():
    counter.report()


@settings(max_examples=60, **_SETTINGS)
@given(kind=st.sampled_from(["rgb", "greyscale", "rgba", "sixteen_bit", "wrong_size",
                             "truncated", "zero_byte", "not_an_image", "huge"]),
       name=st.text(st.characters(codec="utf-8", exclude_characters="/\0",
                                  exclude_categories=("Cs",)), min_size=1, max_size=12),
       suffix=st.sampled_from([".png", ".PNG", ".jpg", ".jpeg"]),
       symlink_loop=st.booleans(), seed=st.integers(0, 2**16))
def test_a_data_folder_with_one_hostile_file_loads_or_fails_in_one_line(
    tmp_path_factory, counters, kind, name, suffix, symlink_loop, seed):
  counters.setdefault("data folders", _Counter("data folders"))()
  root = tmp_path_factory.mktemp("folder")
  rng = np.random.default_rng(seed)
  for split in ("train", "test"):
    for label in ("cat", "dog"):
      (root / split / label).mkdir(parents=True)
      (root / split / label / "0.png").write_bytes(_png(rng.integers(0, 256, (32, 32, 3),
                                                                     dtype=np.uint8)))
  payload, expected = _file_kinds(rng)[kind]
  filename = "new_" + name + suffix  # beside 0.png, never replacing it
  path = root / "train" / "dog" / filename
  try:
    path.write_bytes(payload)
  except OSError:  # a name this filesystem refuses (too long in bytes): not what is tested
    return
  if symlink_loop:
    os.symlink(root / "train", root / "train" / "cat" / "loop")  # a folder that holds itself
    os.symlink("self.png", root / "train" / "cat" / "self.png")  # a link to itself
  try:
    loaded = data.load_split(f"folder:{root}", "train", image_size=32, seed=0)
  except data.DataError as error:
    message = str(error)
    assert expected is None, f"{kind}: {message}"
    assert "\n" not in message and data.printable(filename) in message, message
    return
  assert expected is not None, f"{kind} loaded"
  assert loaded.images.shape == (3, 32, 32, 3) and loaded.images.dtype == np.float32
  got = [np.round(image * 255).astype(np.uint8) for image in loaded.images]
  assert any(np.array_equal(image, expected) for image in got), kind


# --- Config strings ----------------------------------------------------------------------------

_WORDS = st.sampled_from(["none", "pgd", "caf", "cw", "cafd", "hgd", "pixel", "unseen",
                          "white_box", "train_classifier", "evaluate", "report", "folder:",
                          "synthetic", "tfds:cifar10", "head:input", "Conv3x3_2:input", "",
                          " ", ",", "é", "\n", "pgd,,cw", "None", "-1", "1e309"])
_STRINGS = st.one_of(st.text(max_size=30), st.lists(_WORDS, max_size=5).map(",".join))
_FIELDS = ("eval.attacks", "eval.defenses", "eval.threat_models", "eval.adaptive_defenses",
           "eval.adaptive_attacks", "stages", "data.source", "caf.feature_layer",
           "caf.weights", "caf.loss_kind", "eval.sweep_attack", "eval.transfer_attacks",
           "eval.sweep_threat_models", "compute_dtype", "model.name", "model.head")


@settings(max_examples=200, **_SETTINGS)
@given(field=st.sampled_from(_FIELDS), value=_STRINGS,
       eps=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=3))
def test_any_config_string_validates_or_fails_in_one_line(counters, field, value, eps):
  counters.setdefault("config strings", _Counter("config strings"))()
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  group, _, name = field.rpartition(".")
  (config[group] if group else config)[name] = value
  config.eval.sweep_eps = tuple(eps)
  try:
    config_checks.validate(config)
  except config_checks.ConfigError as error:
    assert "\n" not in str(error).strip("\n") or "\n" in value, str(error)
    assert str(error).strip()


# --- api inputs --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def defended(finished_run):
  workdir, _ = finished_run
  return api.load(str(workdir))


def _images(draw_shape, dtype, fill, rng):
  shape = tuple(draw_shape)
  if dtype == "uint8":
    return rng.integers(0, 256, shape, dtype=np.uint8)
  values = rng.uniform(0.0, 1.0, shape)
  if fill == "nan" and values.size:
    values.flat[0] = np.nan
  elif fill == "inf" and values.size:
    values.flat[-1] = np.inf
  elif fill == "0-255":
    values = values * 255.0
  elif fill == "negative" and values.size:
    values.flat[0] = -0.5
  with np.errstate(invalid="ignore"):  # NaN cast to an integer dtype: whatever it gives
    return values.astype(dtype)


@settings(max_examples=80, **_SETTINGS)
@given(shape=st.one_of(
           st.tuples(st.integers(0, 3), st.just(32), st.just(32), st.just(3)),  # NHWC
           st.tuples(st.integers(1, 3), st.just(3), st.just(32), st.just(32)),  # NCHW
           st.lists(st.integers(1, 5), min_size=0, max_size=5)),  # any rank, odd sizes
       dtype=st.sampled_from(["float32", "float16", "float64", "uint8", "int32", "bool"]),
       fill=st.sampled_from(["unit", "nan", "inf", "0-255", "negative"]),
       function=st.sampled_from(["classify", "purify", "defended_logits"]),
       seed=st.integers(0, 2**16))
def test_api_calls_return_or_raise_one_value_error(defended, counters, shape, dtype, fill,
                                                   function, seed):
  counters.setdefault("api inputs", _Counter("api inputs"))()
  images = _images(shape, dtype, fill, np.random.default_rng(seed))
  call = getattr(defended, function)
  valid = (images.ndim == 4 and images.shape[1:] == (32, 32, 3)
           and np.issubdtype(images.dtype, np.floating)
           and (images.size == 0 or (np.all(np.isfinite(images)) and images.min() >= 0
                                     and images.max() <= 1)))
  try:
    out = np.asarray(call(jnp.asarray(images) if seed % 2 else images))
  except ValueError as error:
    assert not valid, f"{images.shape} {images.dtype} {fill}: {error}"
    message = str(error)
    assert "\n" not in message and "images" in message, message
    if valid is False and images.ndim == 4 and images.shape[1:] == (3, 32, 32):
      assert "NCHW" in message
    return
  assert valid, f"{images.shape} {images.dtype} {fill} was accepted"
  want = (len(images), 10) if function != "purify" else images.shape
  assert out.shape == want and np.all(np.isfinite(out))


def test_api_values_are_checked_only_outside_tracing(defended):
  """Under jit and grad only shapes are checked, so attacks keep differentiating through."""
  images = np.full((2, 32, 32, 3), 0.5, np.float32)
  with pytest.raises(ValueError, match=r"found values in \[0.5, 300\]"):
    defended.classify(np.concatenate([images[:1], images[:1] * 600]))
  gradient = jax.grad(lambda x: defended.defended_logits(x)[:, 0].sum())(jnp.asarray(images))
  assert gradient.shape == images.shape and np.all(np.isfinite(gradient))
  jitted = jax.jit(defended.classify)(jnp.asarray(images))
  np.testing.assert_allclose(jitted, defended.classify(images), rtol=1e-5, atol=1e-5)
