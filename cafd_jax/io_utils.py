"""Workdir storage through ``etils.epath``: local folders and buckets (``gs://``, ``s3://``)
alike; atomic writes, so that a reader never sees a half-written file.

Every read and write of a workdir goes through here or through ``epath.Path`` (Orbax
checkpoints take the same paths). Local files are written to a temporary file and renamed;
an object store publishes an object only when its upload completes, so there a plain write is
already atomic.
"""

import io
import json
import os
import tempfile
from typing import Any

from etils import epath
import numpy as np

PathLike = str | os.PathLike


def path(location: PathLike) -> epath.Path:
  """``location`` (a local path or a ``scheme://`` URI) as an ``epath.Path``."""
  return epath.Path(location)


def is_local(location: PathLike) -> bool:
  """True for a path on this machine's file system, False for a bucket URI."""
  return "://" not in os.fspath(location)


def absolute(location: PathLike) -> epath.Path:
  """A local path made absolute (Orbax needs that); a URI as it is."""
  return path(os.path.abspath(location) if is_local(location) else location)


def normalised(location: PathLike) -> str:
  """``location`` without a trailing slash (a local one also without ``..`` parts); a URI
  keeps its ``scheme://``."""
  return os.fspath(path(location)) if not is_local(location) else os.path.normpath(location)


def rename(source: PathLike, target: PathLike) -> None:
  """Moves a file or folder (in a bucket: a copy, then a delete)."""
  if is_local(source):
    os.rename(source, target)
  else:
    path(source).rename(target)


_REQUIRED = object()  # read_json without a default


def read_json(location: PathLike, missing: Any = _REQUIRED) -> Any:
  """The JSON value stored at ``location``; ``missing`` if given and there is no such file."""
  file = path(location)
  if missing is not _REQUIRED and not file.exists():
    return missing
  return json.loads(file.read_text())


def load_npy(location: PathLike, mmap: bool = False) -> np.ndarray:
  """One .npy array; memory-mapped when ``mmap`` and the file is local."""
  if mmap and is_local(location):
    return np.load(location, mmap_mode="r", allow_pickle=False)
  return np.load(io.BytesIO(path(location).read_bytes()), allow_pickle=False)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


class WriteError(OSError):
  """A file could not be written; what was there before is intact. Names the file."""


def write_atomically(location: PathLike, write) -> None:
  """Calls ``write(binary file)`` on a temporary file, then renames it to ``location``; a
  failure (e.g. a full disk) leaves ``location`` as it was and raises WriteError naming it."""
  if not is_local(location):
    _write_object(location, write)
    return
  target = os.fspath(location)
  directory = os.path.dirname(os.path.abspath(target))
  temporary = None
  try:
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-",
                                         suffix=os.path.basename(target))
    with os.fdopen(handle, "wb") as file:
      write(file)
    os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; give a plain file's mode
    os.replace(temporary, target)
  except BaseException as error:
    if temporary is not None and os.path.exists(temporary):
      os.remove(temporary)
    if isinstance(error, OSError) and not isinstance(error, WriteError):
      raise WriteError(f"cannot write {target} ({error.strerror or error}); the files written "
                       f"before are intact") from None
    raise


def _write_object(location: PathLike, write) -> None:
  """A bucket object: built in memory, uploaded in one write (the store publishes it whole)."""
  buffer = io.BytesIO()
  write(buffer)
  target = path(location)
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(buffer.getvalue())
  except OSError as error:
    raise WriteError(f"cannot write {location} ({error.strerror or error}); the files written "
                     f"before are intact") from None


def write_text(location: PathLike, text: str) -> None:
  """Writes ``text`` to ``location`` atomically (temporary file + rename)."""
  write_atomically(location, lambda file: file.write(text.encode("utf-8")))


def write_json(location: PathLike, value: Any) -> None:
  """Writes ``value`` as indented JSON atomically."""
  write_text(location, json.dumps(value, indent=2, sort_keys=False) + "\n")


def write_npy(location: PathLike, array: np.ndarray) -> None:
  """Writes one array in .npy format atomically."""
  write_atomically(location, lambda file: np.save(file, array, allow_pickle=False))


def write_npz(location: PathLike, arrays: dict[str, np.ndarray]) -> None:
  """Writes named arrays in .npz format atomically."""
  write_atomically(location, lambda file: np.savez_compressed(file, **arrays))
