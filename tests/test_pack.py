"""launch/pack_images.py and the "packed:PATH" source: the same data as "folder:", one file."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cafd_jax import config_checks, data

from conftest import ROOT, SHARED_CIFAR10

SIZE = 16  # side of the test images
# class folder -> (train count, test count); sorted order is a_cat, b_dog, c_fish.
CLASSES = {"b_dog": (4, 3), "a_cat": (5, 2), "c_fish": (6, 4)}
SUFFIXES = (".png", ".jpg", ".PNG", ".jpeg")  # cycled through, as the folder source accepts them
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


def _pack(src: Path, out: Path) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "launch/pack_images.py", str(src), str(out)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)


def _write_tree(root: Path, size: int = SIZE) -> Path:
  """train/ and test/ trees of synthetic images as JPEG and PNG files, plus files to skip."""
  for split_index, split in enumerate(data.SPLITS):
    count = sum(counts[split_index] for counts in CLASSES.values())
    pixels = np.round(data.make_synthetic(count, seed=split_index, image_size=size).images * 255)
    images = iter(pixels.astype(np.uint8))
    for name, counts in CLASSES.items():
      folder = root / split / name
      folder.mkdir(parents=True)
      for index in range(counts[split_index]):
        Image.fromarray(next(images)).save(folder / f"img{index}{SUFFIXES[index % len(SUFFIXES)]}",
                                           format="PNG" if index % 2 == 0 else "JPEG")
      (folder / "notes.txt").write_text("not an image")  # skipped: suffix
      (folder / ".hidden.png").write_bytes(b"skipped: hidden")
    (root / split / ".cache").mkdir()  # skipped: hidden class folder
  grey = np.full((size, size), 90, dtype=np.uint8)
  Image.fromarray(grey, mode="L").save(root / "test" / "c_fish" / "grey.png")  # -> RGB
  return root


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, Path]:
  """(ImageFolder tree, the file the script packed it into)."""
  root = _write_tree(tmp_path_factory.mktemp("tree"))
  out = tmp_path_factory.mktemp("packed") / "tree.npz"
  result = _pack(root, out)
  assert result.returncode == 0, result.stderr
  assert result.stderr == "" and len(result.stdout.splitlines()) == 1, result
  assert "train 15 images, test 10 images" in result.stdout and str(out) in result.stdout
  return root, out


def _assert_same(a: data.Dataset, b: data.Dataset) -> None:
  assert a.images.dtype == b.images.dtype == np.float32
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, b.labels)
  assert a.labels.dtype == b.labels.dtype == np.int32
  assert (a.class_names, a.shard, a.num_global) == (b.class_names, b.shard, b.num_global)


def _raises_one_line(fn, *args, **kwargs) -> str:
  with pytest.raises(data.DataError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message and message.strip() == message, message
  return message


# ----------------------------------------------------------------------------- same data


@pytest.mark.parametrize("split", data.SPLITS)
@pytest.mark.parametrize("options", [{}, {"num_examples": 5, "seed": 3}, {"shard": (1, 3)},
                                     {"num_examples": 7, "seed": 1, "shard": (0, 2)}])
def test_packed_equals_folder(packed, split, options):
  root, out = packed
  folder = data.load_split(f"folder:{root}", split, image_size=SIZE, **options)
  from_file = data.load_split(f"packed:{out}", split, image_size=SIZE, **options)
  _assert_same(from_file, folder)
  assert from_file.class_names == ("a_cat", "b_dog", "c_fish")


def test_packed_shard_decodes_only_its_images(packed, monkeypatch):
  _, out = packed
  decoded = []
  original = data._decode_image  # pylint: disable=protected-access
  monkeypatch.setattr(data, "_decode_image",
                      lambda *args: decoded.append(args[2]) or original(*args))
  shard = data.load_split(f"packed:{out}", "train", image_size=SIZE, shard=(1, 3))
  assert len(decoded) == len(shard) == 5 and len(set(decoded)) == 5
  assert all("split 'train'" in what for what in decoded)


def test_packed_file_holds_the_files_bytes_unchanged(packed):
  root, out = packed
  with zipfile.ZipFile(out) as archive:  # a plain, uncompressed .npz
    assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
  with np.load(out, allow_pickle=False) as arrays:
    assert str(arrays["format"]) == "cafd_jax.packed_image_folder" and int(arrays["version"]) == 1
    for split in data.SPLITS:
      files, labels, class_names = data._list_folder(root, split)  # pylint: disable=protected-access
      blob, offsets = arrays[f"{split}_data"], arrays[f"{split}_offsets"]
      assert blob.dtype == np.uint8 and offsets.dtype == np.int64 and len(offsets) == len(files) + 1
      assert [blob[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(files))] == [
          path.read_bytes() for path in files]
      assert arrays[f"{split}_labels"].dtype == np.int32
      np.testing.assert_array_equal(arrays[f"{split}_labels"], labels)
      assert tuple(arrays[f"{split}_class_names"].tolist()) == class_names
  assert {p.suffix for p in files} == {".png", ".jpg", ".PNG", ".jpeg"}  # both formats packed


def test_packed_source_parses_and_validates(tiny_config):
  assert data.parse_source("packed:/data/c10.npz") == ("packed", "/data/c10.npz")
  assert "path" in _raises_one_line(data.parse_source, "packed:")
  tiny_config.data.source = "packed:.carry/cifar10.npz"  # no file needed to validate
  config_checks.validate(tiny_config)


# ----------------------------------------------------------------------------- errors


def test_missing_and_damaged_files_fail_in_one_line(packed, tmp_path):
  _, out = packed
  missing = tmp_path / "missing.npz"
  message = _raises_one_line(data.load_split, f"packed:{missing}", "train", image_size=SIZE)
  assert str(missing) in message and "pack_images.py" in message

  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"this is not a zip file at all" * 10)
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(out.read_bytes()[:out.stat().st_size // 2])
  other = tmp_path / "other.npz"
  np.savez(other, train_data=np.zeros(3, np.uint8))  # an .npz, but not a packed folder
  for bad in (garbage, truncated, other):
    message = _raises_one_line(data.load_split, f"packed:{bad}", "test", image_size=SIZE)
    assert str(bad) in message and "rebuild it with" in message and "pack_images.py" in message


def test_missing_split_and_bad_arrays_fail_in_one_line(packed, tmp_path):
  root, _ = packed
  arrays = data.pack_folder(root)
  no_test = tmp_path / "no_test.npz"
  data.write_packed(str(no_test), {k: v for k, v in arrays.items() if not k.startswith("test_")})
  assert "no 'test' split" in _raises_one_line(data.load_split, f"packed:{no_test}", "test",
                                               image_size=SIZE)
  assert len(data.load_split(f"packed:{no_test}", "train", image_size=SIZE)) == 15

  bad_offsets = tmp_path / "bad_offsets.npz"
  data.write_packed(str(bad_offsets), {**arrays, "train_offsets": arrays["train_offsets"][:-1]})
  assert "offsets" in _raises_one_line(data.load_split, f"packed:{bad_offsets}", "train",
                                       image_size=SIZE)


def test_bad_image_bytes_name_split_and_index(packed, tmp_path):
  root, _ = packed
  arrays = data.pack_folder(root)
  offsets = arrays["test_offsets"]
  blob = arrays["test_data"].copy()
  blob[offsets[3]:offsets[4]] = 7  # image 3 of test: garbage of the same length
  corrupt = tmp_path / "corrupt.npz"
  data.write_packed(str(corrupt), {**arrays, "test_data": blob})
  message = _raises_one_line(data.load_split, f"packed:{corrupt}", "test", image_size=SIZE)
  assert "image 3 of split 'test'" in message and str(corrupt) in message
  assert "pack_images.py" in message
  _assert_same(data.load_split(f"packed:{corrupt}", "train", image_size=SIZE),
               data.load_split(f"folder:{root}", "train", image_size=SIZE))  # other split: fine


def test_wrong_image_size_fails_in_one_line(packed):
  _, out = packed
  message = _raises_one_line(data.load_split, f"packed:{out}", "train")  # image_size=32
  assert f"{SIZE}x{SIZE}, expected 32x32" in message and "split 'train'" in message
  assert str(out) in message and "image_size" in message


def test_packer_rejects_bad_input_writing_nothing(tmp_path):
  out = tmp_path / "out" / "packed.npz"
  missing = tmp_path / "nowhere"
  no_test = tmp_path / "no_test"
  (no_test / "train" / "a").mkdir(parents=True)
  Image.new("RGB", (4, 4)).save(no_test / "train" / "a" / "x.png")
  empty_class = _write_tree(tmp_path / "empty_class", size=4)
  (empty_class / "test" / "d_empty").mkdir()
  for src, named in ((missing, missing), (no_test, no_test / "test"),
                     (empty_class, empty_class / "test" / "d_empty")):
    result = _pack(src, out)
    assert result.returncode == 2, result
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result
    assert str(named) in result.stderr, result.stderr
    assert not out.parent.exists() or not os.listdir(out.parent)  # no file, no temporary
  out.parent.mkdir(exist_ok=True)
  result = _pack(empty_class, out.parent)  # OUT is a folder
  assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result
  assert "is a folder" in result.stderr and not os.listdir(out.parent)


# ----------------------------------------------------------------------------- real CIFAR-10


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(),
                    reason=f"shared CIFAR-10 folder {SHARED_CIFAR10} is absent")
def test_shared_cifar10_packs_the_same_and_fits_the_carry_limit(tmp_path):
  """A tree of links to 5 real JPEGs per class and split packs to the same data; the whole
  tree's files add up to a packed file that fits the 64 MiB a device run can carry."""
  subset = tmp_path / "subset"
  for split in data.SPLITS:
    for class_dir in sorted((SHARED_CIFAR10 / split).iterdir()):
      (subset / split / class_dir.name).mkdir(parents=True)
      for path in sorted(class_dir.iterdir())[:5]:
        (subset / split / class_dir.name / path.name).symlink_to(path)
  out = tmp_path / "subset.npz"
  result = _pack(subset, out)
  assert result.returncode == 0, result.stderr
  for split in data.SPLITS:
    from_file = data.load_split(f"packed:{out}", split)
    _assert_same(from_file, data.load_split(f"folder:{subset}", split))
    assert from_file.class_names == CIFAR10_CLASSES and len(from_file) == 50

  sizes = [entry.stat().st_size for split in data.SPLITS
           for class_dir in os.scandir(SHARED_CIFAR10 / split) for entry in os.scandir(class_dir)]
  assert len(sizes) == 60000
  assert sum(sizes) < 56_000_000, sum(sizes)  # measured: 55,250,913 bytes
  assert sum(sizes) + 12 * len(sizes) + 2**20 < 60 * 2**20  # + offsets, labels, zip headers
