"""Orbax checkpoint helpers: one manager per stage, save, restore the newest intact one."""

import logging
import os
import sys
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cafd_jax import io_utils


class CheckpointError(RuntimeError):
  """A checkpoint is missing or cannot be read; the message says what to do."""


def manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """A CheckpointManager for one stage's directory (created on first save)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(io_utils.absolute(directory), options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def save(checkpoints: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Saves ``state`` at ``step`` and waits, so a kill right after leaves a complete one. A
  failed write (full disk, read-only folder) raises WriteError; earlier checkpoints stay."""
  try:
    checkpoints.save(step, args=ocp.args.StandardSave(state))
    checkpoints.wait_until_finished()
  except Exception as error:  # pylint: disable=broad-except  # Orbax raises many types.
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    raise io_utils.WriteError(
        f"cannot write checkpoint {checkpoints.directory}/{step} ({reason}); the checkpoints "
        f"written before are intact") from None


def _error_kind(error: BaseException) -> str:
  """The built-in class an Orbax/TensorStore error derives from (JSONDecodeError -> ValueError):
  which file of a damaged checkpoint fails first varies by file system and Orbax version."""
  return next(kind.__name__ for kind in type(error).__mro__ if kind.__module__ == "builtins")


class _NeverRetrievedFilter(logging.Filter):
  """Drops asyncio's "... exception was never retrieved" records (a failed restore's reads)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "exception was never retrieved" not in str(record.msg)


def _drop_closed_loop_errors() -> None:
  """A failed restore (a damaged checkpoint) leaves reads in flight. As each ends after Orbax's
  event loop has closed, it raises "Event loop is closed" where nothing can catch it (printed
  as an unraisable exception's traceback), and leaves a future that asyncio logs as "exception
  was never retrieved"; a read not yet started stays an unawaited coroutine, which Python
  reports at exit ("coroutine ... was never awaited"). None says anything to the user, who
  gets one warning line instead: from now on this drops exactly those three kinds of message."""
  warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited",
                          category=RuntimeWarning)
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _NeverRetrievedFilter) for f in asyncio_log.filters):
    asyncio_log.addFilter(_NeverRetrievedFilter())
  if getattr(sys.unraisablehook, "drops_closed_loop", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable) -> None:
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
      previous(unraisable)

  hook.drops_closed_loop = True
  sys.unraisablehook = hook


def _shapes(tree: Any) -> list[tuple[int, ...]]:
  return sorted(tuple(getattr(leaf, "shape", np.shape(leaf))) for leaf in jax.tree.leaves(tree))


def _check_structure(checkpoints: ocp.CheckpointManager, step: int, template: Any) -> None:
  """Raises CheckpointError if checkpoint ``step`` holds arrays of other shapes than
  ``template`` (written by another model or config); lets damaged metadata pass to the
  restore, which then fails as damaged."""
  try:
    with warnings.catch_warnings():  # Orbax's deprecation notes about its own metadata
      warnings.simplefilter("ignore")
      metadata = checkpoints.item_metadata(step)
    stored = _shapes(getattr(metadata, "tree", metadata))
  except Exception:  # pylint: disable=broad-except
    return
  expected = _shapes(template)
  if stored and stored != expected:
    raise CheckpointError(
        f"Checkpoint {checkpoints.directory}/{step} does not fit the model this config builds "
        f"(its arrays have other shapes): it was written with another config; rerun with that "
        f"config or use another --workdir.")


def restore_latest(checkpoints: ocp.CheckpointManager, template: Any,
                   move_damaged: bool = False) -> tuple[int, Any] | None:
  """(step, state) of the newest intact checkpoint, shaped like ``template``; None if there is
  none. A damaged newer one is skipped with one warning line and never deleted: with
  ``move_damaged`` (the stage that writes here) it is moved to ``DIR.damaged-STEP`` so that
  training can write that step again. Raises CheckpointError if every one is damaged."""
  directory = os.fspath(checkpoints.directory)
  damaged = []
  _drop_closed_loop_errors()
  for step in sorted(checkpoints.all_steps(), reverse=True):
    _check_structure(checkpoints, step, template)
    try:
      state = checkpoints.restore(step, args=ocp.args.StandardRestore(template))
    except Exception as error:  # pylint: disable=broad-except  # Orbax raises many types.
      damaged.append(f"{step} ({_error_kind(error)})")
      where = ""
      if move_damaged:
        moved = f"{io_utils.normalised(directory)}.damaged-{step}"
        io_utils.rename(os.path.join(directory, str(step)), moved)
        checkpoints.reload()
        where = f"; moved to {moved}"
      print(f"[checkpoint] warning: {directory}/{step} is unreadable "
            f"({_error_kind(error)}); skipped{where}, nothing deleted", flush=True)
      continue
    return step, state
  if damaged:
    raise CheckpointError(
        f"Every checkpoint in {directory} is unreadable (steps {', '.join(damaged)}); move "
        f"{directory} aside to retrain that stage, or use another --workdir.")
  return None


def require_latest(directory: str, template: Any, what: str) -> Any:
  """The newest intact state in ``directory``; a clear error if there is none."""
  restored = None
  if io_utils.path(directory).is_dir():
    checkpoints = manager(directory)
    try:
      restored = restore_latest(checkpoints, template)
    finally:
      checkpoints.close()
  if restored is None:
    raise CheckpointError(f"No {what} checkpoint in {directory}; run its training stage first "
                          f"with the same --workdir.")
  return restored[1]


def latest_step(directory: str) -> int | None:
  """The number of the latest checkpoint in ``directory`` (None if there is none)."""
  if not io_utils.path(directory).is_dir():
    return None
  checkpoints = manager(directory)
  try:
    return checkpoints.latest_step()
  finally:
    checkpoints.close()
