"""Image classification data: synthetic shapes, ImageFolder trees (files or packed), TFDS.

Every loader returns a `Dataset` of float32 images in [0, 1], shape [N, H, W, 3],
with int32 labels. A data source is named by a string:

  "synthetic"      procedurally drawn shapes (no files, deterministic from a seed)
  "folder:<path>"  <path>/<split>/<class>/*.{png,jpg,jpeg}, classes in sorted order
  "packed:<path>"  such a tree packed into one .npz file by launch/pack_images.py (`pack_folder`):
                   the same images, labels and class names, one file to copy
  "tfds:<name>"    a TensorFlow Datasets dataset (tensorflow_datasets imported lazily)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from cafd_jax import io_utils

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SYNTHETIC_CLASS_NAMES = ("square", "disk", "triangle", "plus", "ring",
                         "hbars", "vbars", "dots", "diamond", "corner")
_SOURCE_USAGE = "use 'synthetic', 'folder:<path>', 'packed:<path>' or 'tfds:<name>'"
_PACKED_FORMAT = "cafd_jax.packed_image_folder"  # the "format" entry of a packed file
_PACKED_VERSION = 1  # its "version" entry; bump on an incompatible change
_PACK_HINT = "python launch/pack_images.py <image folder> <packed file>"
_DECODE_CHUNK = 256  # files per thread-pool task
_SYNTHETIC_CHUNK = 256  # images rendered at once (keeps temporaries in cache)
# Synthetic look; tuned so a 3-layer CNN learns it in ~10 epochs while mean colour stays at chance.
_GLYPH_HALF_SIZE = (0.2, 0.3)  # glyph half-width, as a fraction of the image side
_GLYPH_CONTRAST = (0.3, 0.5)  # RGB distance of a glyph's colour from the background under it
_BLOTCH_STD = 0.025  # std of the low-frequency background colour blotches
_PIXEL_NOISE = 0.02  # std of the i.i.d. Gaussian pixel noise


def printable(text: str) -> str:
  """``text`` with its unprintable characters (a newline in a file name, ...) escaped."""
  return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class DataError(ValueError):
  """Bad data source or contents; message is one line saying what to do (file names with
  unprintable characters shown escaped)."""

  def __init__(self, message: str):
    super().__init__(printable(message))


@dataclasses.dataclass(frozen=True)
class Dataset:
  """An in-memory labelled image set.

  Attributes:
    images: float32 [N, H, W, 3] in [0, 1].
    labels: int32 [N], indices into `class_names`.
    class_names: one name per class, in label order.
    shard: (index, count): these are examples index, index + count, ... of a set of
      `global_size` examples ((0, 1): the whole set).
    global_size: the size of that whole set (None: len(self)).
  """

  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]
  shard: tuple[int, int] = (0, 1)
  global_size: int | None = None

  def __post_init__(self) -> None:
    if self.images.ndim != 4 or self.images.shape[-1] != 3:
      raise DataError(f"images must have shape [N, H, W, 3], got {self.images.shape}")
    if self.labels.shape != self.images.shape[:1]:
      raise DataError(f"{self.labels.shape[0]} labels for {self.images.shape[0]} images")

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def num_global(self) -> int:
    """The size of the whole set this one is a shard of."""
    return len(self) if self.global_size is None else self.global_size

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def take(self, n: int | None) -> Dataset:
    """The first `n` examples of the whole set (all when None), as far as this shard holds them."""
    if n is None:
      return self
    if n < 0:
      raise DataError(f"take() needs a count >= 0, got {n}")
    total = min(n, self.num_global)
    local = len(range(self.shard[0], total, self.shard[1]))
    return Dataset(self.images[:local], self.labels[:local], self.class_names, self.shard,
                   None if self.shard == (0, 1) else total)

  def select_shard(self, shard: tuple[int, int] | None) -> Dataset:
    """Examples index, index + count, ... of this (whole) set: one process's shard."""
    index, count = _checked_shard(shard)
    if count == 1:
      return self
    if self.shard != (0, 1):
      raise DataError(f"cannot take shard {shard} of shard {self.shard}; shard a whole set once")
    return Dataset(self.images[index::count], self.labels[index::count], self.class_names,
                   (index, count), len(self))


def _checked_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
  """``shard`` as (index, count), (0, 1) for None; one clear line for an impossible pair."""
  index, count = (0, 1) if shard is None else shard
  if not 0 <= index < count:
    raise DataError(f"shard {shard} must be (index, count) with 0 <= index < count")
  return index, count


# ----------------------------------------------------------------------------- sources


def parse_source(source: str) -> tuple[str, str]:
  """Splits a source string into ("synthetic", ""), ("folder"|"packed", path) or ("tfds", name)."""
  kind, sep, arg = source.partition(":")
  if kind not in ("synthetic", "folder", "packed", "tfds"):
    raise DataError(f"unknown data source {source!r}; {_SOURCE_USAGE}")
  if kind == "synthetic":
    if sep:
      raise DataError(f"data source {source!r} takes no argument; use plain 'synthetic'")
    return kind, ""
  if not arg:
    raise DataError(f"data source {source!r} lacks its {'name' if kind == 'tfds' else 'path'}; "
                    f"{_SOURCE_USAGE}")
  return kind, arg


def load_split(source: str, split: str, *, image_size: int = 32, num_examples: int | None = None,
               seed: int = 0, shard: tuple[int, int] | None = None) -> Dataset:
  """Loads the "train" or "test" split of a data source (see the module docstring).

  Folder, packed and tfds examples come in a seeded, class-interleaved order, so every
  prefix (`num_examples`, `Dataset.take`) is class-balanced to within one example
  per class; `num_examples` beyond the split size gives the whole split. The
  synthetic source needs `num_examples` and draws train and test from different
  seeds derived from `seed`. `shard=(index, count)` keeps examples index, index + count, ...
  of that order (`Dataset.select_shard`), and a folder or packed source decodes only their
  images. A packed file gives exactly what the folder it was packed from gives.
  """
  kind, arg = parse_source(source)
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
  if num_examples is not None and num_examples <= 0:
    raise DataError(f"num_examples must be positive, got {num_examples}; pass a count > 0 or None")
  if kind == "synthetic":
    if num_examples is None:
      raise DataError("the synthetic source needs num_examples; pass e.g. num_examples=4000")
    return make_synthetic(num_examples, _split_seed(seed, split), image_size).select_shard(shard)
  if kind == "folder":
    return _load_folder(Path(arg), split, image_size, num_examples, seed, shard)
  if kind == "packed":
    return _load_packed(Path(arg), split, image_size, num_examples, seed, shard)
  return _load_tfds(arg, split, image_size, num_examples, seed).select_shard(shard)


def _split_seed(seed: int, split: str) -> int:
  """An independent generator seed per (seed, split)."""
  return int(np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(1)[0])


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split()) or type(error).__name__


def _balanced_order(labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
  """A seeded permutation that deals examples round-robin across classes."""
  rng = np.random.default_rng(seed)
  n = len(labels)
  perm = rng.permutation(n)
  shuffled = labels[perm]
  by_class = np.argsort(shuffled, kind="stable")
  starts = np.cumsum(np.bincount(shuffled, minlength=num_classes)) - np.bincount(
      shuffled, minlength=num_classes)
  rank = np.empty(n, dtype=np.float64)  # position of each example within its class
  rank[by_class] = np.arange(n) - starts[shuffled[by_class]]
  return perm[np.argsort(rank + rng.random(n), kind="stable")]  # random class order per round


def _select(labels: np.ndarray, num_classes: int, num_examples: int | None,
            seed: int) -> np.ndarray:
  return _balanced_order(labels, num_classes, seed)[:num_examples]


def _to_float(images: np.ndarray) -> np.ndarray:
  # One pass, no float temporary; the same bits as images.astype(np.float32) * np.float32(1 / 255).
  return np.multiply(images, np.float32(1 / 255), dtype=np.float32)


# ----------------------------------------------------------------------------- folder


def _visible(path: Path) -> bool:
  return not path.name.startswith(".")


def _list_folder(root: Path, split: str) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
  """Image files, their labels and the class names of `root/split`."""
  if not root.is_dir():
    raise DataError(f"data folder {root} does not exist; "
                    f"point folder:<path> at a folder holding train/ and test/")
  split_dir = root / split
  if not split_dir.is_dir():
    raise DataError(f"split folder {split_dir} does not exist; "
                    f"create it with one subfolder of images per class")
  class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and _visible(p))
  if not class_dirs:
    raise DataError(f"split folder {split_dir} has no class subfolders; "
                    f"put the images in {split_dir}/<class name>/")
  files, labels = [], []
  for label, class_dir in enumerate(class_dirs):
    class_files = sorted(p for p in class_dir.iterdir()
                         if p.suffix.lower() in IMAGE_SUFFIXES and _visible(p) and p.is_file())
    if not class_files:
      raise DataError(f"class folder {class_dir} has no .png/.jpg/.jpeg images; "
                      f"add images or remove the folder")
    files += class_files
    labels += [label] * len(class_files)
  return files, np.asarray(labels, dtype=np.int32), tuple(p.name for p in class_dirs)


def _decode_image(encoded: Path | IO[bytes], image_size: int, what: str, fix: str) -> np.ndarray:
  """One encoded image (a file, or its bytes) as uint8 RGB [S, S, 3], checking its size.

  `what` names the image in errors ("image file x.png"); `fix` says what to do about bad bytes.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(encoded) as image:
      if image.size != (image_size, image_size):
        width, height = image.size
        raise DataError(f"{what} is {width}x{height}, expected {image_size}x{image_size}; "
                        f"resize the data set or pass a matching image_size")
      return _rgb_uint8(image)
  except DataError:
    raise
  except Image.UnidentifiedImageError as error:  # its message holds a BytesIO's repr
    raise DataError(f"cannot read {what} (not an image format PIL knows); {fix}") from error
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
    raise DataError(f"cannot read {what} ({_one_line(error)}); {fix}") from error


_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _rgb_uint8(image: Any) -> np.ndarray:
  """A PIL image as uint8 RGB: 16-bit greyscale keeps its top 8 bits (value / 257); greyscale,
  palette, CMYK and the like convert as PIL does; an alpha channel is dropped (not composited)."""
  if image.mode == "RGB":
    return np.asarray(image, dtype=np.uint8)
  if image.mode in _SIXTEEN_BIT_MODES:
    grey = np.clip(np.round(np.asarray(image, dtype=np.float64) / 257.0), 0, 255)
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)
  return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _read_image(path: Path, image_size: int) -> np.ndarray:
  """One image file as uint8 RGB [S, S, 3], checking its size."""
  return _decode_image(path, image_size, f"image file {path}", "replace or delete it")


def _decode_parallel(count: int, decode: Callable[[int], np.ndarray],
                     image_size: int) -> np.ndarray:
  """uint8 [count, S, S, 3] of `decode(0)`, ..., `decode(count - 1)`, run by a thread pool."""
  out = np.empty((count, image_size, image_size, 3), dtype=np.uint8)

  def decode_chunk(start: int) -> None:
    for i in range(start, min(start + _DECODE_CHUNK, count)):
      out[i] = decode(i)

  with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as pool:
    for future in [pool.submit(decode_chunk, s) for s in range(0, count, _DECODE_CHUNK)]:
      future.result()
  return out


def _selected(labels: np.ndarray, class_names: tuple[str, ...],
              decode: Callable[[int], np.ndarray], image_size: int, num_examples: int | None,
              seed: int, shard: tuple[int, int] | None) -> Dataset:
  """The seeded, balanced selection of a split, decoding (`decode(i)`) only this shard's part."""
  index = _select(labels, len(class_names), num_examples, seed)
  shard_index, num_shards = _checked_shard(shard)
  local = index[shard_index::num_shards]
  images = _decode_parallel(len(local), lambda i: decode(int(local[i])), image_size)
  return Dataset(_to_float(images), labels[local], class_names, (shard_index, num_shards),
                 None if num_shards == 1 else len(index))


def _load_folder(root: Path, split: str, image_size: int, num_examples: int | None,
                 seed: int, shard: tuple[int, int] | None = None) -> Dataset:
  files, labels, class_names = _list_folder(root, split)
  return _selected(labels, class_names, lambda i: _read_image(files[i], image_size), image_size,
                   num_examples, seed, shard)


# ----------------------------------------------------------------------------- packed


def pack_folder(root: Path) -> dict[str, np.ndarray]:
  """The arrays of a packed file (see `write_packed`) holding the ImageFolder tree `root`.

  Per split: "<split>_data" (uint8, every image file's bytes, unchanged, one after another, in
  `_list_folder` order), "<split>_offsets" (int64 [N + 1], file i is data[offsets[i]:offsets[i+1]]),
  "<split>_labels" (int32 [N]) and "<split>_class_names" (str [C]); plus "format" and "version".
  """
  arrays = {"format": np.asarray(_PACKED_FORMAT), "version": np.asarray(_PACKED_VERSION, np.int32)}
  listings = {split: _list_folder(root, split) for split in SPLITS}  # every listing error first
  for split, (files, labels, class_names) in listings.items():
    try:
      blobs = [np.fromfile(path, dtype=np.uint8) for path in files]
    except OSError as error:
      raise DataError(f"cannot read image file {error.filename} ({_one_line(error)}); "
                      f"check its permissions or delete it") from error
    arrays[f"{split}_data"] = np.concatenate(blobs)
    arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(
        np.int64)
    arrays[f"{split}_labels"] = labels
    arrays[f"{split}_class_names"] = np.asarray(class_names, dtype=str)
  return arrays


def write_packed(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes `pack_folder` arrays to `path` as an uncompressed .npz, atomically."""
  io_utils.write_atomically(path, lambda file: np.savez(file, **arrays))


@dataclasses.dataclass(frozen=True)
class _PackedSplit:
  data: np.ndarray  # uint8, the encoded files one after another
  offsets: np.ndarray  # int64 [N + 1]
  labels: np.ndarray  # int32 [N]
  class_names: tuple[str, ...]


def _damaged(path: Path, problem: str) -> DataError:
  return DataError(f"packed file {path} {problem}; rebuild it with {_PACK_HINT}")


def _packed_problem(split: str, data: np.ndarray, offsets: np.ndarray, labels: np.ndarray,
                    class_names: np.ndarray) -> str:
  """What is wrong with the arrays of one packed split ("" if nothing)."""
  if not (data.ndim == offsets.ndim == labels.ndim == class_names.ndim == 1
          and data.dtype == np.uint8 and offsets.dtype.kind == labels.dtype.kind == "i"
          and class_names.dtype.kind == "U"):
    return f"has {split!r} arrays of the wrong shape or type"
  if len(labels) == 0 or len(class_names) == 0:
    return f"holds no {split!r} images"
  if len(offsets) != len(labels) + 1:
    return f"has {len(offsets)} {split!r} offsets for {len(labels)} images"
  if offsets[0] != 0 or offsets[-1] != len(data) or np.any(np.diff(offsets) < 0):
    return f"has {split!r} offsets that do not cut its {len(data)} bytes into images"
  if labels.min() < 0 or labels.max() >= len(class_names):
    return f"has {split!r} labels outside 0..{len(class_names) - 1}"
  return ""


def _read_packed(path: Path, split: str) -> _PackedSplit:
  """One split of a packed file, checked; one-line DataErrors for a missing or damaged file."""
  if not path.is_file():
    problem = "is not a file" if path.exists() else "does not exist"
    raise DataError(f"packed file {path} {problem}; build it with {_PACK_HINT}")
  names = [f"{split}_{key}" for key in ("data", "offsets", "labels", "class_names")]
  try:
    with open(path, "rb") as file:
      if file.read(4) != b"PK\x03\x04":  # every .npz is a zip file
        raise _damaged(path, "is not an .npz file")
      file.seek(0)
      with np.load(file, allow_pickle=False) as archive:
        if "format" not in archive.files or str(archive["format"]) != _PACKED_FORMAT:
          raise _damaged(path, f"lacks the format entry {_PACKED_FORMAT!r}")
        if "version" not in archive.files or int(archive["version"]) != _PACKED_VERSION:
          raise _damaged(path, f"is not of format version {_PACKED_VERSION}")
        if any(name not in archive.files for name in names):
          raise _damaged(path, f"has no {split!r} split")
        data, offsets, labels, class_names = (archive[name] for name in names)
  except DataError:
    raise
  except (OSError, ValueError, EOFError, TypeError, zipfile.BadZipFile) as error:
    raise _damaged(path, f"cannot be read ({_one_line(error)})") from error  # truncated, bad CRC
  problem = _packed_problem(split, data, offsets, labels, class_names)
  if problem:
    raise _damaged(path, problem)
  return _PackedSplit(data, offsets, labels.astype(np.int32, copy=False),
                      tuple(str(name) for name in class_names))


def _load_packed(path: Path, split: str, image_size: int, num_examples: int | None, seed: int,
                 shard: tuple[int, int] | None = None) -> Dataset:
  packed = _read_packed(path, split)

  def decode(i: int) -> np.ndarray:
    encoded = io.BytesIO(packed.data[packed.offsets[i]:packed.offsets[i + 1]])
    return _decode_image(encoded, image_size, f"image {i} of split {split!r} in packed file {path}",
                         f"rebuild the packed file from good images with {_PACK_HINT}")

  return _selected(packed.labels, packed.class_names, decode, image_size, num_examples, seed, shard)


# ----------------------------------------------------------------------------- tfds


def _tfds_arrays(tfds: Any, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """A whole split as (images, labels), preferring tfds.data_source over tfds.load."""
  try:
    source = tfds.data_source(name, split=split)
  except Exception as source_error:  # pylint: disable=broad-except  # e.g. no array_record files
    try:
      data = tfds.as_numpy(tfds.load(name, split=split, batch_size=-1))
    except Exception as load_error:  # pylint: disable=broad-except
      raise DataError(f"cannot load tfds:{name} split {split!r} (data_source: "
                      f"{_one_line(source_error)}; load: {_one_line(load_error)}); "
                      f"check the name and network access, or install tensorflow") from load_error
    return np.asarray(data["image"]), np.asarray(data["label"], dtype=np.int32)
  records = [source[i] for i in range(len(source))]
  if not records:
    raise DataError(f"tfds:{name} split {split!r} is empty; choose another data set or split")
  images = np.stack([np.asarray(record["image"]) for record in records])
  return images, np.asarray([record["label"] for record in records], dtype=np.int32)


def _tfds_class_names(tfds: Any, name: str, num_classes: int) -> tuple[str, ...]:
  try:
    return tuple(tfds.builder(name).info.features["label"].names)
  except Exception:  # pylint: disable=broad-except  # no label names: number the classes
    return tuple(str(i) for i in range(num_classes))


def _load_tfds(name: str, split: str, image_size: int, num_examples: int | None,
               seed: int) -> Dataset:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  images, labels = _tfds_arrays(tfds, name, split)
  if len(labels) == 0:
    raise DataError(f"tfds:{name} split {split!r} is empty; choose another data set or split")
  if images.ndim == 3:
    images = images[..., None]
  if images.shape[1:3] != (image_size, image_size) or images.shape[-1] not in (1, 3):
    raise DataError(f"tfds:{name} images have shape {images.shape[1:]}, expected "
                    f"({image_size}, {image_size}, 1 or 3); pass a matching image_size")
  class_names = _tfds_class_names(tfds, name, int(labels.max()) + 1)
  index = _select(labels, len(class_names), num_examples, seed)
  images = np.broadcast_to(images[index], (len(index), image_size, image_size, 3))
  return Dataset(_to_float(images), labels[index], class_names)


# ----------------------------------------------------------------------------- synthetic


def _shape_mask(shape_id: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Boolean mask of glyph `shape_id` at normalised coordinates (its box is [-1, 1]^2)."""
  au, av = np.abs(u), np.abs(v)
  box = np.maximum(au, av) <= 1
  radius2 = u * u + v * v
  masks = {
      0: lambda: box,  # square
      1: lambda: radius2 <= 1,  # disk
      2: lambda: (v <= 1) & (au <= (v + 1) / 2),  # triangle, apex up
      3: lambda: box & ((au <= 0.3) | (av <= 0.3)),  # plus
      4: lambda: (radius2 <= 1) & (radius2 >= 0.55**2),  # ring
      5: lambda: box & (av >= 0.4) & (av <= 0.85),  # two horizontal bars
      6: lambda: box & ((au <= 0.2) | (au >= 0.65)),  # three vertical bars
      7: lambda: (au - 0.55)**2 + (av - 0.55)**2 <= 0.45**2,  # 2x2 dots
      8: lambda: au + av <= 1,  # diamond
      9: lambda: box & ((u <= -0.4) | (v >= 0.4)),  # L corner
  }
  return masks[shape_id]()


def _upsample_matrix(coarse: int, size: int) -> np.ndarray:
  """[size, coarse] bilinear interpolation weights."""
  pos = np.linspace(0, coarse - 1, size)
  return np.maximum(0, 1 - np.abs(pos[:, None] - np.arange(coarse))).astype(np.float32)


def _synthetic_params(rng: np.random.Generator, n: int, size: int,
                      num_classes: int) -> dict[str, np.ndarray]:
  """Per-image random parameters of the shapes set (all small arrays)."""
  f32 = np.float32
  half = (size * rng.uniform(*_GLYPH_HALF_SIZE, n)).astype(f32)
  # Glyphs are mostly a lighter or darker shade of the background, with some change of hue.
  direction = rng.choice(np.array([-1, 1], f32), (n, 1)) + 0.5 * rng.standard_normal((n, 3))
  direction /= np.linalg.norm(direction, axis=-1, keepdims=True) + 1e-6
  return {
      "label": rng.permutation(np.arange(n) % num_classes).astype(np.int32),
      "half": half,
      "centre": rng.uniform(half[:, None], size - half[:, None], (n, 2)).astype(f32),
      "bg_start": rng.uniform(0.3, 0.7, (n, 3)).astype(f32),
      "bg_end": rng.uniform(0.3, 0.7, (n, 3)).astype(f32),
      "bg_angle": rng.uniform(0, 2 * np.pi, n).astype(f32),
      "blotches": rng.normal(0, _BLOTCH_STD, (n, 3, 4, 4)).astype(f32),
      "blob_centre": rng.uniform(0, size, (n, 2)).astype(f32),
      "blob_sigma": rng.uniform(1, 2, n).astype(f32),
      "blob_alpha": ((rng.random(n) < 0.5) * rng.uniform(0.5, 1, n)).astype(f32),
      "blob_colour": rng.uniform(0, 1, (n, 3)).astype(f32),
      "glyph_offset": (direction * rng.uniform(*_GLYPH_CONTRAST, (n, 1))).astype(f32),
  }


def _background(p: dict[str, np.ndarray], size: int) -> np.ndarray:
  """A smooth colour gradient plus low-frequency colour blotches, [n, 3, S, S]."""
  grid = (np.arange(size, dtype=np.float32) - (size - 1) / 2) / size
  cos, sin = np.cos(p["bg_angle"])[:, None, None], np.sin(p["bg_angle"])[:, None, None]
  t = np.clip(0.5 + grid[None, None, :] * cos + grid[None, :, None] * sin, 0, 1)
  up = _upsample_matrix(p["blotches"].shape[-1], size)
  images = up @ p["blotches"] @ up.T
  images += p["bg_start"][:, :, None, None]
  images += t[:, None] * (p["bg_end"] - p["bg_start"])[:, :, None, None]
  return images


def _blob_alpha(p: dict[str, np.ndarray], size: int) -> np.ndarray:
  """Coverage of the class-independent Gaussian distractor blob, [n, 1, S, S]."""
  coords = np.arange(size, dtype=np.float32)
  scale = (-0.5 / p["blob_sigma"]**2)[:, None]
  gy = np.exp((coords - p["blob_centre"][:, 1:2])**2 * scale)
  gx = np.exp((coords - p["blob_centre"][:, 0:1])**2 * scale)
  return (p["blob_alpha"][:, None, None] * gy[:, :, None] * gx[:, None, :])[:, None]


def _glyph_alpha(p: dict[str, np.ndarray], size: int, supersample: int = 2) -> np.ndarray:
  """Anti-aliased coverage of each image's glyph (shape = label), [n, 1, S, S]."""
  labels, centre, half = p["label"], p["centre"], p["half"]
  coords = (np.arange(size * supersample, dtype=np.float32) + 0.5) / supersample
  mask = np.zeros((len(labels), size * supersample, size * supersample), dtype=bool)
  for shape_id in np.unique(labels):
    idx = np.flatnonzero(labels == shape_id)
    u = (coords[None, None, :] - centre[idx, 0, None, None]) / half[idx, None, None]
    v = (coords[None, :, None] - centre[idx, 1, None, None]) / half[idx, None, None]
    mask[idx] = _shape_mask(int(shape_id), u, v)
  cover = np.zeros((len(labels), size, size), dtype=np.float32)
  for dy in range(supersample):
    for dx in range(supersample):
      cover += mask[:, dy::supersample, dx::supersample]
  return (cover / np.float32(supersample**2))[:, None]


def _glyph_colour(p: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
  """The background colour under the glyph centre plus a random offset, [n, 3, 1, 1]."""
  n, size = images.shape[0], images.shape[-1]
  ix = np.clip(p["centre"].astype(np.int64), 0, size - 1)
  base = np.clip(images[np.arange(n), :, ix[:, 1], ix[:, 0]], 0, 1)
  lighter, darker = base + p["glyph_offset"], base - p["glyph_offset"]
  colour = np.where((lighter < 0) | (lighter > 1), darker, lighter)  # keep the contrast in range
  return np.clip(colour, 0, 1)[:, :, None, None]


def _render(p: dict[str, np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
  """Channel-first images [n, 3, S, S] from their parameters, with pixel noise from `rng`."""
  images = _background(p, size)
  images += _blob_alpha(p, size) * (p["blob_colour"][:, :, None, None] - images)
  images += _glyph_alpha(p, size) * (_glyph_colour(p, images) - images)
  noise = rng.standard_normal(images.shape, dtype=np.float32)
  noise *= np.float32(_PIXEL_NOISE)
  images += noise
  return np.clip(images, 0, 1, out=images)


def make_synthetic(num_examples: int, seed: int, image_size: int = 32,
                   num_classes: int = 10) -> Dataset:
  """A deterministic shapes data set whose class evidence is purely spatial.

  Each image shows one glyph (the class; see SYNTHETIC_CLASS_NAMES) at a random
  position, 0.4 to 0.6 of the image side across, in a random colour of moderate
  contrast to a smooth, noisy gradient background; half the images also get a
  small distractor blob. Colours do not depend on the class, so mean colour is
  uninformative. Labels cycle through the classes in a seeded order.
  """
  if num_examples <= 0:
    raise DataError(f"num_examples must be positive, got {num_examples}; pass a count > 0")
  if not 1 <= num_classes <= len(SYNTHETIC_CLASS_NAMES):
    raise DataError(f"synthetic data has 1 to {len(SYNTHETIC_CLASS_NAMES)} classes, "
                    f"got num_classes={num_classes}")
  rng = np.random.default_rng(seed)
  params = _synthetic_params(rng, num_examples, image_size, num_classes)
  images = np.empty((num_examples, image_size, image_size, 3), dtype=np.float32)
  for start in range(0, num_examples, _SYNTHETIC_CHUNK):
    part = slice(start, start + _SYNTHETIC_CHUNK)
    rendered = _render({k: v[part] for k, v in params.items()}, image_size, rng)
    images[part] = rendered.transpose(0, 2, 3, 1)
  return Dataset(images, params["label"], SYNTHETIC_CLASS_NAMES[:num_classes])


# ----------------------------------------------------------------------------- batching


def iterate_batches(dataset: Dataset, batch_size: int, *, seed: int | None,
                    drop_remainder: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of (images, labels) batches, shuffled by `seed` (None: in dataset order)."""
  if batch_size <= 0:
    raise DataError(f"batch_size must be positive, got {batch_size}")
  n = len(dataset)
  order = None if seed is None else np.random.default_rng(seed).permutation(n)
  stop = n - n % batch_size if drop_remainder else n
  for start in range(0, stop, batch_size):
    end = min(start + batch_size, n)
    index = slice(start, end) if order is None else order[start:end]
    yield dataset.images[index], dataset.labels[index]
