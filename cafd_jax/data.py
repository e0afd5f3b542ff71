"""Image classification data: a synthetic shapes set, ImageFolder trees and TFDS.

Every loader returns a :class:`Dataset` holding float32 images in [0, 1] with
shape [N, H, W, 3] and int32 labels. Sources are named by a string:

* ``"synthetic"`` -- procedurally generated shapes (no files, deterministic).
* ``"folder:<path>"`` -- ``<path>/<split>/<class>/*.{png,jpg,jpeg}``.
* ``"tfds:<name>"`` -- a TensorFlow Datasets dataset (imported lazily).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SYNTHETIC_CLASS_NAMES = (
    "square", "disk", "triangle", "plus", "ring",
    "hbars", "vbars", "dots", "diamond", "corner",
)
_SOURCE_KINDS = ("synthetic", "folder", "tfds")
_DECODE_CHUNK = 256
_SYNTHETIC_CHUNK = 256
_GLYPH_CONTRAST = (0.3, 0.5)  # RGB distance of a glyph's colour from the local background
_PIXEL_NOISE = 0.025


class DataError(ValueError):
    """Bad data source or contents; message is one line saying what to do."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """An in-memory labelled image set.

    Attributes:
      images: float32 [N, H, W, 3] in [0, 1].
      labels: int32 [N], indices into ``class_names``.
      class_names: one name per class, in label order.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise DataError(f"images must have shape [N, H, W, 3], got {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"labels shape {self.labels.shape} does not match {self.images.shape[0]} images"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, n: int | None) -> Dataset:
        """Returns the first ``n`` examples (all of them when ``n`` is None)."""
        if n is None:
            return self
        if n < 0:
            raise DataError(f"take() needs a non-negative count, got {n}")
        return Dataset(self.images[:n], self.labels[:n], self.class_names)


# --------------------------------------------------------------------------- sources


def parse_source(source: str) -> tuple[str, str]:
    """Splits ``"kind[:arg]"`` into ``(kind, arg)``; raises DataError when malformed."""
    kind, sep, arg = source.partition(":")
    usage = "use 'synthetic', 'folder:<path>' or 'tfds:<name>'"
    if kind not in _SOURCE_KINDS:
        raise DataError(f"unknown data source {source!r}; {usage}")
    if kind == "synthetic":
        if sep:
            raise DataError(f"data source {source!r} takes no argument; use plain 'synthetic'")
        return kind, ""
    if not arg:
        raise DataError(f"data source {source!r} is missing its argument; {usage}")
    return kind, arg


def load_split(
    source: str,
    split: str,
    *,
    image_size: int = 32,
    num_examples: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Loads one split ("train" or "test") of a data source.

    For folder and tfds sources the examples are returned in a seeded,
    class-interleaved order, so any prefix (``num_examples`` or ``take``) is
    class-balanced to within one example per class. ``num_examples`` larger
    than the split returns the whole split. The synthetic source needs
    ``num_examples`` and derives distinct seeds for train and test.
    """
    kind, arg = parse_source(source)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {SPLITS}")
    if num_examples is not None and num_examples <= 0:
        raise DataError(f"num_examples must be positive, got {num_examples}; pass a positive count or None")
    if kind == "synthetic":
        if num_examples is None:
            raise DataError("the synthetic source needs num_examples; pass e.g. num_examples=4000")
        return make_synthetic(num_examples, _split_seed(seed, split), image_size=image_size)
    if kind == "folder":
        return _load_folder(Path(arg), split, image_size, num_examples, seed)
    return _load_tfds(arg, split, image_size, num_examples, seed)


def _split_seed(seed: int, split: str) -> int:
    """Derives an independent generator seed for each split."""
    state = np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(1)
    return int(state[0])


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _balanced_order(labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """Seeded permutation that deals examples round-robin across classes."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    perm = rng.permutation(n)
    shuffled = labels[perm]
    by_class = np.argsort(shuffled, kind="stable")
    counts = np.bincount(shuffled, minlength=num_classes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(n, dtype=np.int64)
    rank[by_class] = np.arange(n) - starts[shuffled[by_class]]
    class_slot = rng.permutation(num_classes)
    return perm[np.argsort(rank * num_classes + class_slot[shuffled], kind="stable")]


def _select(labels: np.ndarray, num_classes: int, num_examples: int | None, seed: int) -> np.ndarray:
    return _balanced_order(labels, num_classes, seed)[:num_examples]


def _to_float(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) * np.float32(1.0 / 255.0)


# --------------------------------------------------------------------------- folder


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(
        (p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def _image_files(class_dir: Path) -> list[Path]:
    files = sorted(
        p for p in class_dir.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
    if not files:
        raise DataError(
            f"class folder {class_dir} has no .png/.jpg/.jpeg images; add images or remove the folder"
        )
    return files


def _list_folder(root: Path, split: str) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """Lists image files, labels and class names of ``root/split``."""
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; point folder:<path> at a folder with train/ and test/")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"split folder {split_dir} does not exist; create it with one subfolder per class")
    class_dirs = _class_dirs(split_dir)
    if not class_dirs:
        raise DataError(f"split folder {split_dir} has no class subfolders; put images in {split_dir}/<class>/")
    files: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        class_files = _image_files(class_dir)
        files.extend(class_files)
        labels.extend([label] * len(class_files))
    return files, np.asarray(labels, dtype=np.int32), tuple(p.name for p in class_dirs)


def _read_image(path: Path, image_size: int) -> np.ndarray:
    """Decodes one image file to uint8 RGB, checking its size."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.size != (image_size, image_size):
                width, height = image.size
                raise DataError(
                    f"image {path} is {width}x{height}, expected {image_size}x{image_size}; "
                    f"resize the data or pass a matching image_size"
                )
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(
            f"cannot read image file {path} ({_one_line(error)}); replace or delete it"
        ) from error


def _decode_files(files: Sequence[Path], image_size: int) -> np.ndarray:
    """Decodes files into a uint8 [N, S, S, 3] array using a thread pool."""
    out = np.empty((len(files), image_size, image_size, 3), dtype=np.uint8)

    def decode_chunk(start: int) -> None:
        for i in range(start, min(start + _DECODE_CHUNK, len(files))):
            out[i] = _read_image(files[i], image_size)

    workers = min(16, 2 * (os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(decode_chunk, s) for s in range(0, len(files), _DECODE_CHUNK)]:
            future.result()
    return out


def _load_folder(
    root: Path, split: str, image_size: int, num_examples: int | None, seed: int
) -> Dataset:
    files, labels, class_names = _list_folder(root, split)
    index = _select(labels, len(class_names), num_examples, seed)
    images = _decode_files([files[i] for i in index], image_size)
    return Dataset(_to_float(images), labels[index], class_names)


# --------------------------------------------------------------------------- tfds


def _tfds_arrays(tfds: Any, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads a whole split as (uint8 images, labels), preferring tfds.data_source."""
    try:
        source = tfds.data_source(name, split=split)
        records = [source[i] for i in range(len(source))]
        images = np.stack([np.asarray(r["image"]) for r in records]) if records else None
        return images, np.asarray([r["label"] for r in records], dtype=np.int32)
    except Exception as source_error:  # data_source needs array_record files; fall back.
        try:
            data = tfds.as_numpy(tfds.load(name, split=split, batch_size=-1))
            return np.asarray(data["image"]), np.asarray(data["label"], dtype=np.int32)
        except Exception as load_error:
            raise DataError(
                f"cannot load tfds:{name} split {split!r} (data_source: {_one_line(source_error)}; "
                f"load: {_one_line(load_error)}); check the name, network access or install tensorflow"
            ) from load_error


def _tfds_class_names(tfds: Any, name: str, num_classes: int) -> tuple[str, ...]:
    try:
        return tuple(tfds.builder(name).info.features["label"].names)
    except Exception:  # builder info without label names: fall back to numbers.
        return tuple(str(i) for i in range(num_classes))


def _load_tfds(
    name: str, split: str, image_size: int, num_examples: int | None, seed: int
) -> Dataset:
    import tensorflow_datasets as tfds

    images, labels = _tfds_arrays(tfds, name, split)
    if images is None or len(labels) == 0:
        raise DataError(f"tfds:{name} split {split!r} is empty; choose another dataset or split")
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[1:3] != (image_size, image_size) or images.shape[-1] not in (1, 3):
        raise DataError(
            f"tfds:{name} images have shape {images.shape[1:]}, expected "
            f"({image_size}, {image_size}, 1 or 3); pass a matching image_size"
        )
    class_names = _tfds_class_names(tfds, name, int(labels.max()) + 1)
    index = _select(labels, len(class_names), num_examples, seed)
    images = np.broadcast_to(images[index], (len(index), image_size, image_size, 3))
    return Dataset(_to_float(images), labels[index], class_names)


# --------------------------------------------------------------------------- synthetic


def _shape_mask(shape_id: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of glyph ``shape_id`` in normalised coordinates (box = [-1, 1]^2)."""
    au, av = np.abs(u), np.abs(v)
    box = np.maximum(au, av) <= 1.0
    radius2 = u * u + v * v
    if shape_id == 0:  # filled square
        return box
    if shape_id == 1:  # disk
        return radius2 <= 1.0
    if shape_id == 2:  # triangle, apex up
        return (v <= 1.0) & (au <= (v + 1.0) * 0.5)
    if shape_id == 3:  # plus
        return box & ((au <= 0.3) | (av <= 0.3))
    if shape_id == 4:  # ring
        return (radius2 <= 1.0) & (radius2 >= 0.55**2)
    if shape_id == 5:  # two horizontal bars
        return box & (av >= 0.4) & (av <= 0.85)
    if shape_id == 6:  # three vertical bars
        return box & ((au <= 0.2) | (au >= 0.65))
    if shape_id == 7:  # four dots in a 2x2 grid
        return (au - 0.55) ** 2 + (av - 0.55) ** 2 <= 0.45**2
    if shape_id == 8:  # diamond
        return au + av <= 1.0
    if shape_id == 9:  # L corner
        return box & ((u <= -0.4) | (v >= 0.4))
    raise ValueError(f"unknown shape id {shape_id}")


def _upsample_matrix(coarse: int, size: int) -> np.ndarray:
    """[size, coarse] bilinear interpolation weights."""
    pos = np.linspace(0.0, coarse - 1.0, size)
    return np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(coarse)[None, :])).astype(np.float32)


def _synthetic_params(rng: np.random.Generator, n: int, size: int, num_classes: int) -> dict[str, np.ndarray]:
    """Draws the per-image random parameters (all small arrays) of the shapes set."""
    f32 = np.float32
    half = rng.uniform(0.15 * size, 0.25 * size, n).astype(f32)
    # Mostly a lighter or darker shade of the background, with some hue change.
    direction = rng.choice(np.array([-1.0, 1.0], f32), (n, 1)) + 0.5 * rng.standard_normal((n, 3)).astype(f32)
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True) + 1e-6
    return {
        "label": rng.permutation(np.arange(n) % num_classes).astype(np.int32),
        "half": half,
        "centre": rng.uniform(half[:, None], size - half[:, None], (n, 2)).astype(f32),
        "bg_start": rng.uniform(0.3, 0.7, (n, 3)).astype(f32),
        "bg_end": rng.uniform(0.3, 0.7, (n, 3)).astype(f32),
        "bg_angle": rng.uniform(0.0, 2 * np.pi, n).astype(f32),
        "blotches": rng.normal(0.0, 0.035, (n, 3, 4, 4)).astype(f32),
        "blob_centre": rng.uniform(0, size, (n, 2)).astype(f32),
        "blob_sigma": rng.uniform(1.0, 2.0, n).astype(f32),
        "blob_alpha": ((rng.random(n) < 0.5) * rng.uniform(0.5, 1.0, n)).astype(f32),
        "blob_colour": rng.uniform(0.0, 1.0, (n, 3)).astype(f32),
        "glyph_offset": direction * rng.uniform(*_GLYPH_CONTRAST, (n, 1)).astype(f32),
    }


def _background(p: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Smooth colour gradient plus low-frequency colour blotches, channel-first [n, 3, S, S]."""
    grid = (np.arange(size, dtype=np.float32) - (size - 1) / 2) / size
    cos, sin = np.cos(p["bg_angle"]), np.sin(p["bg_angle"])
    t = 0.5 + grid[None, None, :] * cos[:, None, None] + grid[None, :, None] * sin[:, None, None]
    np.clip(t, 0.0, 1.0, out=t)
    up = _upsample_matrix(p["blotches"].shape[-1], size)
    images = up @ p["blotches"] @ up.T
    images += p["bg_start"][:, :, None, None]
    images += t[:, None] * (p["bg_end"] - p["bg_start"])[:, :, None, None]
    return images


def _blob_alpha(p: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Class-independent Gaussian distractor blob coverage, [n, 1, S, S] (about half empty)."""
    coords = np.arange(size, dtype=np.float32)
    dy2 = (coords[None, :] - p["blob_centre"][:, 1:2]) ** 2
    dx2 = (coords[None, :] - p["blob_centre"][:, 0:1]) ** 2
    scale = (-0.5 / p["blob_sigma"] ** 2)[:, None]
    gy, gx = np.exp(dy2 * scale), np.exp(dx2 * scale)
    return (p["blob_alpha"][:, None, None] * gy[:, :, None] * gx[:, None, :])[:, None]


def _glyph_alpha(p: dict[str, np.ndarray], size: int, supersample: int = 2) -> np.ndarray:
    """Anti-aliased glyph coverage [n, 1, S, S] for each image's label, centre and size."""
    labels, centre, half = p["label"], p["centre"], p["half"]
    n = len(labels)
    fine = size * supersample
    coords = (np.arange(fine, dtype=np.float32) + 0.5) / supersample
    mask = np.zeros((n, fine, fine), dtype=bool)
    for shape_id in np.unique(labels):
        idx = np.flatnonzero(labels == shape_id)
        u = (coords[None, None, :] - centre[idx, 0, None, None]) / half[idx, None, None]
        v = (coords[None, :, None] - centre[idx, 1, None, None]) / half[idx, None, None]
        mask[idx] = _shape_mask(int(shape_id), u, v)
    cover = np.zeros((n, size, size), dtype=np.float32)
    for dy in range(supersample):
        for dx in range(supersample):
            cover += mask[:, dy::supersample, dx::supersample]
    return (cover * np.float32(1.0 / supersample**2))[:, None]


def _glyph_colour(p: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """Glyph colour [n, 3, 1, 1]: the background under the glyph centre plus a random offset."""
    n, size = images.shape[0], images.shape[-1]
    ix = np.clip(p["centre"].astype(np.int64), 0, size - 1)
    base = np.clip(images[np.arange(n), :, ix[:, 1], ix[:, 0]], 0.0, 1.0)
    offset = p["glyph_offset"]
    colour = np.where((base + offset < 0) | (base + offset > 1), base - offset, base + offset)
    return np.clip(colour, 0.0, 1.0)[:, :, None, None]


def _render(p: dict[str, np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """Renders channel-first images [n, 3, S, S], adding pixel noise drawn from ``rng``."""
    images = _background(p, size)
    images += _blob_alpha(p, size) * (p["blob_colour"][:, :, None, None] - images)
    images += _glyph_alpha(p, size) * (_glyph_colour(p, images) - images)
    noise = rng.standard_normal(images.shape, dtype=np.float32)
    noise *= np.float32(_PIXEL_NOISE)
    images += noise
    return np.clip(images, 0.0, 1.0, out=images)


def make_synthetic(num_examples: int, seed: int, image_size: int = 32, num_classes: int = 10) -> Dataset:
    """Deterministic shapes dataset whose class evidence is purely spatial.

    Each image shows one glyph (class = glyph shape, see SYNTHETIC_CLASS_NAMES)
    of random position and size (0.3 to 0.5 of the image side) in a random
    colour at moderate contrast to a noisy gradient background; about half the
    images also get a small distractor blob. Colours are independent of the
    class, so mean colour carries (almost) no label information.
    """
    if num_examples <= 0:
        raise DataError(f"num_examples must be positive, got {num_examples}; pass a positive count")
    if not 1 <= num_classes <= len(SYNTHETIC_CLASS_NAMES):
        raise DataError(f"synthetic data has 1 to {len(SYNTHETIC_CLASS_NAMES)} classes, got {num_classes}")
    rng = np.random.default_rng(seed)
    params = _synthetic_params(rng, num_examples, image_size, num_classes)
    images = np.empty((num_examples, image_size, image_size, 3), dtype=np.float32)
    for start in range(0, num_examples, _SYNTHETIC_CHUNK):
        part = slice(start, start + _SYNTHETIC_CHUNK)
        rendered = _render({k: v[part] for k, v in params.items()}, image_size, rng)
        images[part] = rendered.transpose(0, 2, 3, 1)
    return Dataset(images, params["label"], SYNTHETIC_CLASS_NAMES[:num_classes])


# --------------------------------------------------------------------------- batching


def iterate_batches(
    dataset: Dataset, batch_size: int, *, seed: int | None, drop_remainder: bool
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (images, labels) batches for one epoch; ``seed=None`` keeps dataset order."""
    if batch_size <= 0:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    n = len(dataset)
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        if seed is None:
            index = slice(start, min(start + batch_size, n))
        yield dataset.images[index], dataset.labels[index]
