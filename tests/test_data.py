"""Data sources: synthetic shapes, ImageFolder trees, TFDS (faked), batching and errors."""

import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cafd_jax import data

CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


def _raises_one_line(match_path, fn, *args, **kwargs) -> str:
  """Calls fn, expecting a one-line DataError that names `match_path`."""
  with pytest.raises(data.DataError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message and message.strip() == message, message
  assert str(match_path) in message, message
  return message


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_per_seed():
  a, b = data.make_synthetic(200, seed=7), data.make_synthetic(200, seed=7)
  assert a.images.tobytes() == b.images.tobytes()
  assert a.labels.tobytes() == b.labels.tobytes()
  c = data.make_synthetic(200, seed=8)
  assert a.images.tobytes() != c.images.tobytes()


def test_synthetic_shape_dtype_range_and_classes():
  dataset = data.make_synthetic(300, seed=0)
  assert dataset.images.shape == (300, 32, 32, 3) and dataset.images.dtype == np.float32
  assert dataset.labels.shape == (300,) and dataset.labels.dtype == np.int32
  assert 0.0 <= dataset.images.min() and dataset.images.max() <= 1.0
  assert len(dataset) == 300 and dataset.num_classes == 10
  assert dataset.class_names == data.SYNTHETIC_CLASS_NAMES
  np.testing.assert_array_equal(np.bincount(dataset.labels, minlength=10), [30] * 10)
  assert dataset.images.std() > 0.05  # not blank
  small = data.make_synthetic(20, seed=0, image_size=24, num_classes=4)
  assert small.images.shape == (20, 24, 24, 3) and small.num_classes == 4
  assert set(small.labels.tolist()) == {0, 1, 2, 3}


def test_synthetic_splits_differ_and_are_reproducible():
  train = data.load_split("synthetic", "train", num_examples=50, seed=3)
  test = data.load_split("synthetic", "test", num_examples=50, seed=3)
  assert not np.allclose(train.images, test.images)
  again = data.load_split("synthetic", "test", num_examples=50, seed=3)
  assert again.images.tobytes() == test.images.tobytes()
  other = data.load_split("synthetic", "test", num_examples=50, seed=4)
  assert other.images.tobytes() != test.images.tobytes()


def test_synthetic_mean_colour_is_uninformative():
  train = data.load_split("synthetic", "train", num_examples=2000, seed=0)
  test = data.load_split("synthetic", "test", num_examples=1000, seed=0)
  train_mean, test_mean = train.images.mean(axis=(1, 2)), test.images.mean(axis=(1, 2))
  centroids = np.stack([train_mean[train.labels == c].mean(0) for c in range(10)])
  distances = ((test_mean[:, None] - centroids[None]) ** 2).sum(-1)
  accuracy = (distances.argmin(1) == test.labels).mean()
  assert accuracy < 0.3, accuracy


def test_synthetic_needs_a_positive_count():
  _raises_one_line("num_examples", data.load_split, "synthetic", "train")
  _raises_one_line("num_examples", data.load_split, "synthetic", "train", num_examples=0)
  _raises_one_line("num_examples", data.make_synthetic, -5, seed=0)
  _raises_one_line("num_classes", data.make_synthetic, 10, seed=0, num_classes=11)


# ----------------------------------------------------------------------------- folder

# class folder -> number of images; sorted order is a_dog, b_cat, c_fish.
FOLDER_CLASSES = {"b_cat": 4, "a_dog": 3, "c_fish": 5}


def _write_png(path: Path, value: int, size: int = 8, mode: str = "RGB") -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.full((size, size, 3), value, dtype=np.uint8)
  image = Image.fromarray(pixels)
  (image.convert(mode) if mode != "RGB" else image).save(path)


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
  """train/ and test/ trees of 8x8 PNGs whose pixel value is 20 * label + 2 * index + 10."""
  for split in data.SPLITS:
    for label, name in enumerate(sorted(FOLDER_CLASSES)):
      for index in range(FOLDER_CLASSES[name]):
        _write_png(tmp_path / split / name / f"img{index}.png", 20 * label + 2 * index + 10)
    (tmp_path / split / "a_dog" / "notes.txt").write_text("not an image")  # ignored
    (tmp_path / split / ".hidden").mkdir()  # ignored
  _write_png(tmp_path / "test" / "c_fish" / "grey.png", 100, mode="L")  # converted to RGB
  return tmp_path


def test_folder_loads_classes_in_sorted_order(image_folder: Path):
  dataset = data.load_split(f"folder:{image_folder}", "train", image_size=8)
  assert dataset.class_names == ("a_dog", "b_cat", "c_fish")
  assert len(dataset) == 12 and dataset.images.shape == (12, 8, 8, 3)
  assert dataset.images.dtype == np.float32 and dataset.labels.dtype == np.int32
  assert 0.0 <= dataset.images.min() and dataset.images.max() <= 1.0
  np.testing.assert_array_equal(np.bincount(dataset.labels), [3, 4, 5])
  values = np.round(dataset.images[:, 0, 0, 0] * 255).astype(int)
  np.testing.assert_array_equal((values - 10) // 20, dataset.labels)  # label from pixel value
  assert len(set(values.tolist())) == 12  # every file exactly once
  test = data.load_split(f"folder:{image_folder}", "test", image_size=8)
  assert len(test) == 13
  grey = test.images[np.isclose(test.images[:, 0, 0, 0], 100 / 255)]
  assert grey.shape == (1, 8, 8, 3) and np.allclose(grey, 100 / 255)


def test_folder_subset_is_seeded_and_balanced(image_folder: Path):
  source = f"folder:{image_folder}"
  subset = data.load_split(source, "train", image_size=8, num_examples=6, seed=1)
  assert len(subset) == 6
  np.testing.assert_array_equal(np.bincount(subset.labels, minlength=3), [2, 2, 2])
  again = data.load_split(source, "train", image_size=8, num_examples=6, seed=1)
  assert subset.images.tobytes() == again.images.tobytes()
  full = data.load_split(source, "train", image_size=8, seed=1)
  assert full.take(6).images.tobytes() == subset.images.tobytes()  # subset = prefix
  others = [data.load_split(source, "train", image_size=8, num_examples=6, seed=s) for s in (2, 3)]
  assert any(o.images.tobytes() != subset.images.tobytes() for o in others)
  assert len(data.load_split(source, "train", image_size=8, num_examples=100)) == 12


def test_folder_errors_name_the_path(tmp_path: Path, image_folder: Path):
  missing = tmp_path / "nowhere"
  _raises_one_line(missing, data.load_split, f"folder:{missing}", "train")

  no_split = tmp_path / "no_split"
  (no_split / "train" / "a").mkdir(parents=True)
  _raises_one_line(no_split / "test", data.load_split, f"folder:{no_split}", "test")

  no_classes = tmp_path / "no_classes"
  (no_classes / "train").mkdir(parents=True)
  (no_classes / "train" / "loose.png").write_bytes(b"")
  _raises_one_line(no_classes / "train", data.load_split, f"folder:{no_classes}", "train")

  empty_class = image_folder / "train" / "d_empty"
  empty_class.mkdir()
  (empty_class / "readme.md").write_text("no images here")
  _raises_one_line(empty_class, data.load_split, f"folder:{image_folder}", "train", image_size=8)


def test_folder_bad_images_name_the_file(image_folder: Path):
  corrupt = image_folder / "test" / "b_cat" / "corrupt.png"
  corrupt.write_bytes(b"\x89PNG\r\nthis is not really a png")
  _raises_one_line(corrupt, data.load_split, f"folder:{image_folder}", "test", image_size=8)
  corrupt.unlink()

  wrong_size = image_folder / "test" / "a_dog" / "big.png"
  _write_png(wrong_size, 50, size=16)
  message = _raises_one_line(wrong_size, data.load_split, f"folder:{image_folder}", "test",
                             image_size=8)
  assert "16x16" in message


def test_folder_default_size_mismatch(image_folder: Path):
  message = _raises_one_line(image_folder / "train", data.load_split, f"folder:{image_folder}",
                             "train")  # images are 8x8, default image_size is 32
  assert "8x8" in message


# ----------------------------------------------------------------------------- sources


def test_parse_source():
  assert data.parse_source("synthetic") == ("synthetic", "")
  assert data.parse_source("folder:/data/c10") == ("folder", "/data/c10")
  assert data.parse_source("folder:C:/x:y") == ("folder", "C:/x:y")
  assert data.parse_source("tfds:cifar10") == ("tfds", "cifar10")
  for bad in ("", "cifar10", "s3:bucket/x", "folder:", "tfds:", "synthetic:extra", "Folder:/x"):
    _raises_one_line(repr(bad), data.parse_source, bad)


def test_load_split_rejects_bad_arguments():
  _raises_one_line("'s3:bucket'", data.load_split, "s3:bucket", "train", num_examples=5)
  _raises_one_line("'valid'", data.load_split, "synthetic", "valid", num_examples=5)
  _raises_one_line("-1", data.load_split, "synthetic", "train", num_examples=-1)


# ----------------------------------------------------------------------------- batching


def test_shards_partition_the_selection_and_decode_only_their_files(image_folder: Path,
                                                                     monkeypatch):
  source = f"folder:{image_folder}"
  whole = data.load_split(source, "train", image_size=8, num_examples=10, seed=1)
  decoded = []
  original = data._read_image  # pylint: disable=protected-access
  monkeypatch.setattr(data, "_read_image", lambda path, size: decoded.append(path) or original(
      path, size))
  shards = [data.load_split(source, "train", image_size=8, num_examples=10, seed=1,
                            shard=(index, 3)) for index in range(3)]
  assert len(decoded) == 10  # every selected file read once, by one shard
  for index, shard in enumerate(shards):
    assert shard.shard == (index, 3) and shard.num_global == 10
    np.testing.assert_array_equal(shard.images, whole.images[index::3])
    np.testing.assert_array_equal(shard.labels, whole.labels[index::3])
  synthetic = data.load_split("synthetic", "train", num_examples=7, shard=(1, 2))
  np.testing.assert_array_equal(
      synthetic.labels, data.load_split("synthetic", "train", num_examples=7).labels[1::2])
  with pytest.raises(data.DataError, match="shard"):
    data.load_split(source, "train", image_size=8, shard=(3, 3))


def _indexed(n: int) -> data.Dataset:
  """A dataset whose labels are the example indices."""
  return data.Dataset(np.zeros((n, 2, 2, 3), np.float32), np.arange(n, dtype=np.int32),
                      tuple(str(i) for i in range(n)))


def test_iterate_batches_covers_each_example_once():
  dataset = _indexed(23)
  batches = list(data.iterate_batches(dataset, 5, seed=4, drop_remainder=False))
  assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
  assert all(x.shape == (len(y), 2, 2, 3) for x, y in batches)
  seen = np.concatenate([y for _, y in batches])
  np.testing.assert_array_equal(np.sort(seen), np.arange(23))
  assert not np.array_equal(seen, np.arange(23))  # shuffled

  again = np.concatenate([y for _, y in data.iterate_batches(dataset, 5, seed=4,
                                                             drop_remainder=False)])
  np.testing.assert_array_equal(seen, again)
  other = np.concatenate([y for _, y in data.iterate_batches(dataset, 5, seed=5,
                                                             drop_remainder=False)])
  assert not np.array_equal(seen, other)

  in_order = np.concatenate([y for _, y in data.iterate_batches(dataset, 5, seed=None,
                                                                drop_remainder=False)])
  np.testing.assert_array_equal(in_order, np.arange(23))

  dropped = list(data.iterate_batches(dataset, 5, seed=4, drop_remainder=True))
  assert [len(y) for _, y in dropped] == [5, 5, 5, 5]
  assert len(set(np.concatenate([y for _, y in dropped]).tolist())) == 20


def test_take():
  dataset = _indexed(10)
  assert dataset.take(None) is dataset
  np.testing.assert_array_equal(dataset.take(4).labels, np.arange(4))
  assert len(dataset.take(0)) == 0 and len(dataset.take(99)) == 10
  assert dataset.take(4).class_names == dataset.class_names
  shard = dataset.select_shard((1, 3))  # examples 1, 4, 7 of 10
  np.testing.assert_array_equal(shard.labels, [1, 4, 7])
  assert shard.num_global == 10 and dataset.select_shard((0, 1)) is dataset
  for n, expected in ((8, [1, 4, 7]), (7, [1, 4]), (2, [1]), (1, []), (99, [1, 4, 7])):
    np.testing.assert_array_equal(shard.take(n).labels, expected)  # this shard's part of [:n]
    assert shard.take(n).num_global == min(n, 10) and shard.take(n).shard == (1, 3)


# ----------------------------------------------------------------------------- tfds (faked)


def _fake_tfds(records, *, source_fails: bool = False, load_fails: bool = False):
  """A stand-in tensorflow_datasets module that never downloads; logs calls in `.calls`."""
  module = types.ModuleType("tensorflow_datasets")
  module.calls = []

  def data_source(name, split):
    module.calls.append(("data_source", name, split))
    if source_fails:
      raise NotImplementedError("only array_record is supported\nsecond line")
    return list(records)

  def load(name, split, batch_size):
    module.calls.append(("load", name, split, batch_size))
    if load_fails:
      raise ModuleNotFoundError("No module named 'tensorflow'")
    return {"image": np.stack([r["image"] for r in records]),
            "label": np.array([r["label"] for r in records])}

  def builder(name):
    label = types.SimpleNamespace(names=["zero", "one", "two"])
    return types.SimpleNamespace(info=types.SimpleNamespace(features={"label": label}))

  module.data_source, module.load, module.builder = data_source, load, builder
  module.as_numpy = lambda tree: tree
  return module


def _records(n: int = 9, size: int = 4, channels: int = 3) -> list[dict]:
  return [{"image": np.full((size, size, channels), 10 * i, np.uint8), "label": i % 3}
          for i in range(n)]


def test_tfds_data_source(monkeypatch):
  fake = _fake_tfds(_records())
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  dataset = data.load_split("tfds:fake3", "test", image_size=4)
  assert fake.calls == [("data_source", "fake3", "test")]
  assert dataset.class_names == ("zero", "one", "two")
  assert dataset.images.shape == (9, 4, 4, 3) and dataset.images.dtype == np.float32
  values = np.round(dataset.images[:, 0, 0, 0] * 255).astype(int)
  np.testing.assert_array_equal((values // 10) % 3, dataset.labels)
  assert sorted(values.tolist()) == list(range(0, 90, 10))
  subset = data.load_split("tfds:fake3", "train", image_size=4, num_examples=3)
  np.testing.assert_array_equal(np.sort(subset.labels), [0, 1, 2])


def test_tfds_falls_back_to_load_and_expands_grey(monkeypatch):
  fake = _fake_tfds(_records(channels=1), source_fails=True)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  dataset = data.load_split("tfds:fake3", "train", image_size=4)
  assert [c[0] for c in fake.calls] == ["data_source", "load"]
  assert fake.calls[1][-1] == -1  # batch_size=-1: the whole split as arrays
  assert dataset.images.shape == (9, 4, 4, 3)
  np.testing.assert_array_equal(dataset.images[..., 0], dataset.images[..., 2])


def test_tfds_errors_are_one_line(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets",
                      _fake_tfds(_records(), source_fails=True, load_fails=True))
  _raises_one_line("tfds:fake3", data.load_split, "tfds:fake3", "train", image_size=4)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", _fake_tfds(_records()))
  message = _raises_one_line("tfds:fake3", data.load_split, "tfds:fake3", "train")
  assert "image_size" in message  # 4x4 images, default image_size 32


# ----------------------------------------------------------------------------- real CIFAR-10


@pytest.mark.skipif(not CIFAR10.is_dir(), reason=f"shared CIFAR-10 folder {CIFAR10} is absent")
def test_shared_cifar10_test_split():
  subset = data.load_split(f"folder:{CIFAR10}", "train", num_examples=100)
  assert subset.class_names == CIFAR10_CLASSES
  np.testing.assert_array_equal(np.bincount(subset.labels, minlength=10), [10] * 10)
  test = data.load_split(f"folder:{CIFAR10}", "test")
  assert test.class_names == CIFAR10_CLASSES
  assert test.images.shape == (10000, 32, 32, 3) and test.images.dtype == np.float32
  np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), [1000] * 10)
  assert 0.0 <= test.images.min() and test.images.max() <= 1.0
  assert 0.3 < test.images.mean() < 0.7
