"""Orbax checkpoint helpers: one manager per stage, save, restore the latest."""

import os
from typing import Any

import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint is missing or cannot be read; the message says what to do."""


def manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """A CheckpointManager for one stage's directory (created on first save)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(checkpoints: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Saves ``state`` at ``step`` and waits, so a kill right after leaves a complete one."""
  checkpoints.save(step, args=ocp.args.StandardSave(state))
  checkpoints.wait_until_finished()


def restore_latest(checkpoints: ocp.CheckpointManager, template: Any) -> tuple[int, Any] | None:
  """(step, state) of the latest checkpoint, shaped like ``template``; None if none."""
  step = checkpoints.latest_step()
  if step is None:
    return None
  try:
    state = checkpoints.restore(step, args=ocp.args.StandardRestore(template))
  except Exception as error:  # Orbax raises many types for damaged files.
    raise CheckpointError(
        f"Checkpoint {checkpoints.directory}/{step} is unreadable ({type(error).__name__}); "
        f"delete that folder to fall back to an earlier one or to retrain.") from None
  return step, state


def require_latest(directory: str, template: Any, what: str) -> Any:
  """The latest state in ``directory``; a clear error if there is none."""
  restored = None
  if os.path.isdir(directory):
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
  if not os.path.isdir(directory):
    return None
  checkpoints = manager(directory)
  try:
    return checkpoints.latest_step()
  finally:
    checkpoints.close()
