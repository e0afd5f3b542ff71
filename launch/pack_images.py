"""Packs an ImageFolder tree into one file for the data source "packed:OUT".

  python launch/pack_images.py SRC OUT

SRC holds train/<class>/* and test/<class>/* image files, found as "folder:SRC" finds them.
OUT gets every file's encoded bytes unchanged, with labels and class names per split, as one
uncompressed .npz (see cafd_jax.data.pack_folder), written atomically: a machine that receives
only the repository can carry it instead of the tree. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from cafd_jax import data  # pylint: disable=g-import-not-at-top,wrong-import-position


def _summary(arrays: dict, out: str) -> str:
  counts = ", ".join(f"{split} {len(arrays[f'{split}_labels'])} images" for split in data.SPLITS)
  encoded = sum(arrays[f"{split}_data"].nbytes for split in data.SPLITS)
  return (f"packed {counts} ({encoded} bytes of encoded images) into {out}: "
          f"{Path(out).stat().st_size} bytes")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("src", metavar="SRC", help="ImageFolder tree: SRC/{train,test}/<class>/*")
  parser.add_argument("out", metavar="OUT", help="the packed file to write (e.g. x.npz)")
  args = parser.parse_args(argv)
  if Path(args.out).is_dir():
    print(f"pack_images: {args.out} is a folder; name the file to write, e.g. "
          f"{Path(args.out) / 'images.npz'}", file=sys.stderr)
    return 2
  try:
    arrays = data.pack_folder(Path(args.src))
    data.write_packed(args.out, arrays)
  except data.DataError as error:
    print(f"pack_images: {error}", file=sys.stderr)
    return 2
  except OSError as error:
    print(f"pack_images: cannot write {args.out} ({' '.join(str(error).split())}); "
          f"choose a writable file path", file=sys.stderr)
    return 2
  print(_summary(arrays, args.out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
