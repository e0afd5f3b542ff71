"""The epoch loop shared by every training stage: sharding, shuffling, resume, checkpoints,
progress.

A step function is pure: ``step_fn(state, batch, key, frozen) -> (state, metrics)``, with
``batch`` a tuple of arrays whose first axis is the global batch and ``frozen`` whatever the step
reads but does not train (e.g. the classifier under a denoiser). ``fit`` compiles it once with
explicit shardings over a data mesh (``cafd_jax.parallel``): batch split over devices, state
replicated or FSDP-split, ``frozen`` replicated, state buffers donated.
"""

import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cafd_jax import budget as budgets
from cafd_jax import checkpoint, metrics, parallel

StepFn = Callable[[Any, tuple, jax.Array, Any], tuple[Any, dict]]


class NonFiniteError(RuntimeError):
  """A train step produced a non-finite loss or state; the message says which and where."""


def non_finite_metrics(metrics: dict) -> list[str]:
  """Names of the step metrics (losses, accuracies) that are NaN or infinite."""
  values = jax.device_get(metrics)
  return [name for name, value in values.items() if not np.all(np.isfinite(value))]


@jax.jit
def _all_finite(state: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(state)
            if jnp.issubdtype(leaf.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of one epoch: a function of (seed, epoch) only, so resumes match."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def local_epoch_order(num_local: int, seed: int, epoch: int) -> np.ndarray:
  """This process's order of its own shard for one epoch (``epoch_order`` with one process)."""
  if jax.process_count() == 1:
    return epoch_order(num_local, seed, epoch)
  return np.random.default_rng([seed, epoch, jax.process_index()]).permutation(num_local)


def compile_step(step_fn: StepFn, state: Any, mesh: Mesh, fsdp: bool = False
                 ) -> tuple[Callable, Any]:
  """``jax.jit(step_fn)`` with explicit in/out shardings, and the state's shardings."""
  state_shardings = parallel.state_shardings(state, mesh, fsdp)
  replicated = parallel.replicated(mesh)
  compiled = jax.jit(step_fn,
                     in_shardings=(state_shardings, parallel.batch_sharding(mesh), replicated,
                                   replicated),
                     out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  return compiled, state_shardings


def time_steps(*, state: Any, step_fn: StepFn, arrays: Sequence[np.ndarray], batch_size: int,
               key: jax.Array, frozen: Any = None, mesh: Mesh | None = None, fsdp: bool = False,
               global_size: int | None = None, steps: int = 3, **unused: Any
               ) -> tuple[float, float]:
  """(seconds of the first step, compilation included; median seconds of the ``steps`` after)
  of ``step_fn`` on the first batch of ``arrays``, compiled as ``fit`` compiles it, on a copy
  of ``state`` (``state`` itself is left as it was). ``fit``'s other options are accepted and
  ignored, so that both can take the same keywords."""
  mesh = mesh or parallel.make_mesh()
  rows = parallel.local_rows(batch_size, mesh)
  local = tuple(array[:rows.stop - rows.start] if global_size is not None
                else array[:batch_size][rows] for array in arrays)
  batch = parallel.shard_batch(local, mesh, batch_size)
  compiled, state_shardings = compile_step(step_fn, state, mesh, fsdp)
  copy = parallel.place_state(jax.tree.map(jnp.copy, state), state_shardings)
  frozen = parallel.replicate(frozen, mesh)
  key = parallel.replicate(key, mesh)
  seconds = []
  for _ in range(steps + 1):
    start = time.perf_counter()
    copy, step_metrics = compiled(copy, batch, key, frozen)
    jax.block_until_ready((copy, step_metrics))
    seconds.append(time.perf_counter() - start)
  return seconds[0], float(np.median(seconds[1:]))


def fit(*, stage: str, state: Any, step_fn: StepFn, arrays: Sequence[np.ndarray],
        batch_size: int, num_epochs: int, seed: int, key: jax.Array, checkpoint_dir: str,
        workdir: str | None, log_every_steps: int = 50, max_to_keep: int = 2,
        frozen: Any = None, mesh: Mesh | None = None, fsdp: bool = False,
        prefetch_batches: int = 2, global_size: int | None = None,
        budget: budgets.Budget | None = None) -> Any:
  """Runs ``step_fn`` over shuffled global batches for ``num_epochs``, resuming from checkpoints.

  ``batch_size`` is global; every process draws the same epoch order and feeds only its own rows
  of each batch (``parallel.local_rows``). A checkpoint (the whole ``state`` pytree, written by
  all processes together) is saved after every epoch, numbered by the steps done; a rerun
  restores the latest and continues with identical data order and keys, on any number of
  devices, from the middle of an epoch too.

  A non-finite metric (checked one step late, so that steps stay queued on the device) or a
  non-finite state about to be saved stops the stage with ``NonFiniteError``; the bad state is
  never saved and earlier checkpoints stay.

  With a ``budget``, training stops at the first step boundary past it, writes a checkpoint
  there and records the cut (``Budget.cut``); the same call with more time continues from it.

  With ``global_size``, ``arrays`` hold only this process's shard (examples p, p + P, ... of
  ``global_size``; ``data.load_split(shard=...)``): each process shuffles its own shard
  (``local_epoch_order``) and feeds its rows of every global batch from it. One process gives
  the same batches as without; several give another (equally random) order, so a resume must
  keep the process count.
  """
  mesh = mesh or parallel.make_mesh()
  sharded = global_size is not None
  num_examples = global_size if sharded else len(arrays[0])
  rows = parallel.local_rows(batch_size, mesh)
  per_process = rows.stop - rows.start
  if sharded:  # the same count on every process: the smallest shard holds size // processes
    steps_per_epoch = (num_examples // jax.process_count()) // per_process
  else:
    steps_per_epoch = num_examples // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{stage}: batch size {batch_size} exceeds the {num_examples} examples; "
                     f"lower the batch size or use more data.")
  compiled, state_shardings = compile_step(step_fn, state, mesh, fsdp)
  state = parallel.place_state(state, state_shardings)
  frozen = parallel.replicate(frozen, mesh)
  step_key = lambda step: parallel.replicate(jax.random.fold_in(key, step), mesh)

  def batch_indices(order: np.ndarray, index: int) -> np.ndarray:
    if sharded:  # this process's rows come from its own shard
      return np.sort(order[index * per_process:(index + 1) * per_process])
    return np.sort(order[index * batch_size:(index + 1) * batch_size])[rows]

  def batches(start_step):
    for epoch in range(start_step // steps_per_epoch, num_epochs):
      order = (local_epoch_order(len(arrays[0]), seed, epoch) if sharded
               else epoch_order(num_examples, seed, epoch))
      for index in range(start_step % steps_per_epoch if epoch == start_step // steps_per_epoch
                         else 0, steps_per_epoch):
        indices = batch_indices(order, index)
        local = tuple(array[indices] for array in arrays)
        yield epoch, index, parallel.shard_batch(local, mesh, batch_size)

  total_steps = num_epochs * steps_per_epoch
  checkpoints = checkpoint.manager(checkpoint_dir, max_to_keep)
  try:
    restored = checkpoint.restore_latest(checkpoints, state, move_damaged=True)
    start_step = 0
    if restored is not None:
      start_step, state = restored
      start_step = _steps_done(start_step, state, steps_per_epoch)
      print(f"[{stage}] resuming after {_position(start_step, steps_per_epoch, num_epochs)}",
            flush=True)
    logger = metrics.ProgressLogger(stage, total_steps, workdir, batch_size, log_every_steps)
    saved = [start_step if restored is not None else None]
    unchecked = None  # (step number, metrics) of the step before the one just dispatched

    def check(step_number: int, step_metrics: dict) -> None:
      bad = non_finite_metrics(step_metrics)
      if bad:
        _stop_non_finite(stage, step_number, f"non-finite {', '.join(bad)}", saved[0])

    def save(step_number: int) -> None:
      check(step_number, step_metrics)
      if not bool(_all_finite(state)):
        _stop_non_finite(stage, step_number, "non-finite parameters or optimiser state (a "
                         "non-finite gradient)", saved[0])
      checkpoint.save(checkpoints, step_number, state)
      saved[0] = step_number

    try:
      for epoch, index, batch in parallel.prefetch(batches(start_step), prefetch_batches):
        step = epoch * steps_per_epoch + index
        state, step_metrics = compiled(state, batch, step_key(step), frozen)
        if unchecked is not None:
          check(*unchecked)
        unchecked = (step + 1, step_metrics)
        logger.step(step + 1, step_metrics)
        epoch_done = index == steps_per_epoch - 1
        if epoch_done:
          save(step + 1)
        if step + 1 < total_steps and budget is not None and budget.spent():
          if not epoch_done:
            save(step + 1)
          budget.cut(stage=stage, epoch=f"{epoch + 1}/{num_epochs}",
                     step=f"{step + 1}/{total_steps}")
          print(f"[{stage}] time budget of {budget.max_seconds:g}s spent: stopped after "
                f"{_position(step + 1, steps_per_epoch, num_epochs)} (checkpoint written)",
                flush=True)
          break
    finally:
      logger.close()
  finally:
    checkpoints.close()
  return state


def _stop_non_finite(stage: str, step: int, what: str, last_saved: int | None) -> None:
  kept = (f"the last checkpoint (step {last_saved}) is kept" if last_saved is not None
          else "no checkpoint was written")
  raise NonFiniteError(f"{stage} stopped at step {step}: {what}; this state is not saved and "
                       f"{kept}. Lower the learning rate or check the data, then rerun.")


def _steps_done(number: int, state: Any, steps_per_epoch: int) -> int:
  """The steps a restored checkpoint holds. Checkpoints are numbered by steps; those written
  before budgets existed were numbered by epochs, which their optimiser's step count reveals."""
  first = state[0] if isinstance(state, (tuple, list)) and state else state
  counted = getattr(first, "step", None)
  if isinstance(counted, jax.Array):  # replicated: any local copy will do
    counted = np.asarray(counted.addressable_shards[0].data)
  if counted is not None and int(counted) != number and int(counted) == number * steps_per_epoch:
    return int(counted)
  return number


def _position(steps_done: int, steps_per_epoch: int, num_epochs: int) -> str:
  """'epoch 3/10' at an epoch's end, else 'step 5/12 of epoch 3/10'."""
  epoch, index = divmod(steps_done, steps_per_epoch)
  if index == 0:
    return f"epoch {epoch}/{num_epochs}"
  return f"step {index}/{steps_per_epoch} of epoch {epoch + 1}/{num_epochs}"
