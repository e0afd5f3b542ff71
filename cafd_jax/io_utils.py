"""Atomic file writes: a reader never sees a half-written file."""

import json
import os
import tempfile
from typing import Any

import numpy as np


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


class WriteError(OSError):
  """A file could not be written; what was there before is intact. Names the file."""


def write_atomically(path: str, write) -> None:
  """Calls ``write(binary file)`` on a temporary file, then renames it to ``path``; a failure
  (e.g. a full disk) leaves ``path`` as it was and raises WriteError naming it."""
  directory = os.path.dirname(os.path.abspath(path))
  temporary = None
  try:
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-",
                                         suffix=os.path.basename(path))
    with os.fdopen(handle, "wb") as file:
      write(file)
    os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; give a plain file's mode
    os.replace(temporary, path)
  except BaseException as error:
    if temporary is not None and os.path.exists(temporary):
      os.remove(temporary)
    if isinstance(error, OSError) and not isinstance(error, WriteError):
      raise WriteError(f"cannot write {path} ({error.strerror or error}); the files written "
                       f"before are intact") from None
    raise


def write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` atomically (temporary file + rename)."""
  write_atomically(path, lambda file: file.write(text.encode("utf-8")))


def write_json(path: str, value: Any) -> None:
  """Writes ``value`` as indented JSON atomically."""
  write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def write_npy(path: str, array: np.ndarray) -> None:
  """Writes one array in .npy format atomically."""
  write_atomically(path, lambda file: np.save(file, array, allow_pickle=False))


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes named arrays in .npz format atomically."""
  write_atomically(path, lambda file: np.savez_compressed(file, **arrays))
