"""The epoch loop shared by every training stage: shuffling, resume, checkpoints, progress."""

from typing import Any, Callable, Sequence

import jax
import numpy as np

from cafd_jax import checkpoint, metrics

StepFn = Callable[[Any, tuple[np.ndarray, ...], jax.Array], tuple[Any, dict]]


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of one epoch: a function of (seed, epoch) only, so resumes match."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def fit(*, stage: str, state: Any, step_fn: StepFn, arrays: Sequence[np.ndarray],
        batch_size: int, num_epochs: int, seed: int, key: jax.Array, checkpoint_dir: str,
        workdir: str | None, log_every_steps: int = 50, max_to_keep: int = 2) -> Any:
  """Runs ``step_fn`` over shuffled batches for ``num_epochs``, resuming from checkpoints.

  A checkpoint (the whole ``state`` pytree) is written after every epoch, numbered by epochs
  done; a rerun restores the latest and continues with identical data order and keys.
  """
  num_examples = len(arrays[0])
  steps_per_epoch = num_examples // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{stage}: batch size {batch_size} exceeds the {num_examples} examples; "
                     f"lower the batch size or use more data.")
  checkpoints = checkpoint.manager(checkpoint_dir, max_to_keep)
  try:
    restored = checkpoint.restore_latest(checkpoints, state)
    start_epoch = 0
    if restored is not None:
      start_epoch, state = restored
      print(f"[{stage}] resuming after epoch {start_epoch}/{num_epochs}", flush=True)
    logger = metrics.ProgressLogger(stage, num_epochs * steps_per_epoch, workdir, batch_size,
                                    log_every_steps)
    try:
      for epoch in range(start_epoch, num_epochs):
        order = epoch_order(num_examples, seed, epoch)
        for index in range(steps_per_epoch):
          batch_indices = np.sort(order[index * batch_size:(index + 1) * batch_size])
          batch = tuple(array[batch_indices] for array in arrays)
          step = epoch * steps_per_epoch + index
          state, step_metrics = step_fn(state, batch, jax.random.fold_in(key, step))
          logger.step(step + 1, step_metrics)
        checkpoint.save(checkpoints, epoch + 1, state)
    finally:
      logger.close()
  finally:
    checkpoints.close()
  return state
