"""One run's claim on its workdir: a single writer, and a config that keeps its meaning.

``config.json`` in a workdir is the config its checkpoints and crafted set were made with. A
rerun may change what only steers the run (stages, evaluation grid, logging, budgets, devices);
a change to what the stored output means (``MEANINGFUL``) stops the run before anything is
written.
"""

import copy
import fcntl
import importlib.util
import json
import os
from typing import Any

from cafd_jax import io_utils

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
# Config fields (top level or whole groups) whose change would make stored output mean
# something else: the model, the data, the seed, how the classifier and denoisers train,
# the CAF and the crafted set, and where upstream output comes from.
MEANINGFUL = ("seed", "compute_dtype", "upstream_workdir", "model", "data", "classifier", "caf",
              "craft", "denoiser")
# What an airbench config recorded before model.whiten_padding existed built (the padded
# whitening); today's default is airbench's own geometry.
LEGACY_WHITEN_PADDING = "same"


# What a bucket workdir needs besides etils.epath and Orbax: the fsspec file system of its
# scheme, and for gs:// the client that Orbax asks about the bucket's layout.
BUCKET_PACKAGES = {"gs": ("gcsfs", "google.cloud.storage"), "s3": ("s3fs",)}


class WorkdirError(RuntimeError):
  """The workdir is in use or holds output of another config; the message says what to do."""


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # its parent package is missing
    return False


def check_storage(workdir: str) -> None:
  """Raises WorkdirError if ``workdir`` is a bucket whose client packages are missing."""
  if io_utils.is_local(workdir):
    return
  scheme = os.fspath(workdir).split("://")[0]
  if scheme not in BUCKET_PACKAGES:
    raise WorkdirError(f"--workdir {workdir}: {scheme}:// is not supported; use a local path, "
                       f"{', '.join(s + '://' for s in BUCKET_PACKAGES)}.")
  missing = [module for module in BUCKET_PACKAGES[scheme] if not _installed(module)]
  if missing:
    packages = " ".join(module.replace(".", "-") for module in missing)
    raise WorkdirError(f"--workdir {workdir} needs {', '.join(missing)}: pip install {packages}")


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
  if isinstance(value, dict):
    flat = {}
    for key, item in value.items():
      flat.update(_flatten(item, f"{prefix}.{key}"))
    return flat
  return {prefix: json.loads(json.dumps(value))}  # tuples and lists compare alike


def _legacy_values(stored: dict) -> dict[str, Any]:
  """Fields a recorded config lacks whose absence meant a value other than today's default."""
  if str(stored.get("model", {}).get("name", "")).startswith("airbench"):
    return {"model.whiten_padding": LEGACY_WHITEN_PADDING}
  return {}


def upgrade(stored: dict) -> dict:
  """A recorded config.json (a copy) with the fields it predates set to what their absence
  meant when it was written (``_legacy_values``), so that every reader builds what that run
  built; fields already there are kept."""
  upgraded = copy.deepcopy(stored)
  for field, value in _legacy_values(stored).items():
    *groups, name = field.split(".")
    node = upgraded
    for group in groups:
      node = node.setdefault(group, {})
    node.setdefault(name, value)
  return upgraded


def read_recorded(workdir: str) -> dict:
  """DIR/config.json, upgraded (``upgrade``); OSError or ValueError if missing or unreadable."""
  return upgrade(io_utils.read_json(io_utils.path(workdir) / CONFIG_FILE))


def drift(stored: dict, config: dict) -> list[str]:
  """The meaningful fields whose values differ, as 'field: stored -> new'; ``stored`` is read
  as ``upgrade`` reads it. Fields one side lacks (added to the code since) do not count."""
  stored = upgrade(stored)
  changes = []
  for group in MEANINGFUL:
    if group not in stored or group not in config:
      continue
    old, new = _flatten(stored[group], group), _flatten(config[group], group)
    for field in sorted(old.keys() & new.keys()):
      if old[field] != new[field]:
        changes.append(f"{field}: {old[field]!r} -> {new[field]!r}")
  return changes


def check_config(workdir: str, config: dict) -> None:
  """Raises WorkdirError if ``workdir`` holds output of a config that differs from ``config``
  in a meaningful field; reads only."""
  path = io_utils.path(workdir) / CONFIG_FILE
  if not path.exists():
    return
  try:
    stored = io_utils.read_json(path)
  except (OSError, ValueError) as error:
    raise WorkdirError(f"{path} is unreadable ({type(error).__name__}); restore it or use "
                       f"another --workdir.") from None
  changes = drift(stored, config)
  if changes:
    raise WorkdirError(
        f"{workdir} holds output of another config ({'; '.join(changes)}); use another "
        f"--workdir, or rerun with {path}'s values.")


class Lock:
  """An exclusive lock on ``workdir`` (``flock`` on ``DIR/.lock``, holding the PID) for this
  process's lifetime: the kernel releases it when the process ends, however it ends, so a
  killed run's lock never blocks the next.

  A bucket has no locks: there ``acquire`` only creates the workdir, and one writer per
  workdir is the user's to keep (on a pod, only process 0 writes shared files).
  """

  def __init__(self, workdir: str):
    self.workdir, self._file, self._bucket = workdir, None, False

  @property
  def held(self) -> bool:
    return self._file is not None or self._bucket

  def acquire(self) -> None:
    """Takes the lock (creating the workdir); WorkdirError naming the holder if it is taken."""
    if self.held:
      return
    if not io_utils.is_local(self.workdir):
      try:
        io_utils.path(self.workdir).mkdir(parents=True, exist_ok=True)
      except OSError as error:
        raise WorkdirError(f"cannot create {self.workdir} ({error}); check the bucket's name "
                           f"and permissions or use another --workdir.") from None
      self._bucket = True
      return
    path = os.path.join(self.workdir, LOCK_FILE)
    try:
      os.makedirs(self.workdir, exist_ok=True)
      file = open(path, "a+")  # pylint: disable=consider-using-with  # held until release
    except OSError as error:
      raise WorkdirError(f"cannot write {path} ({error.strerror or error}); make "
                         f"{self.workdir} writable or use another --workdir.") from None
    try:
      fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      file.seek(0)
      holder = file.read().strip() or "unknown"
      file.close()
      raise WorkdirError(f"{self.workdir} is in use by process {holder} (another main.py run); "
                         f"wait for it to finish or use another --workdir.") from None
    file.seek(0)
    file.truncate()
    file.write(f"{os.getpid()}\n")
    file.flush()
    self._file = file

  def release(self) -> None:
    self._bucket = False
    if self._file is not None:
      self._file.close()  # closing releases the flock
      self._file = None
