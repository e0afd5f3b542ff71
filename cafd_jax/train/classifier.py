"""Target-classifier training: cross-entropy (optionally label-smoothed), SGD or Adam, optional
crop+flip augmentation, optional patch-whitening initialisation of the first layer."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from cafd_jax import augment, losses, models
from cafd_jax.attacks.pgd import projected_gradient_ascent
from cafd_jax.models import common as model_common
from cafd_jax.train import common

WHITENING_IMAGES = 5000  # training images whose patch covariance sets the whitening layer


def microbatches(array: jnp.ndarray, count: int) -> jnp.ndarray:
  """[B, ...] -> [count, B / count, ...]; microbatch j holds rows j, j + count, ... so that each
  one is spread over every device of a batch-sharded array."""
  if array.shape[0] % count:
    raise ValueError(f"batch size {array.shape[0]} must be a multiple of "
                     f"accumulation_steps={count}.")
  return jnp.swapaxes(array.reshape(array.shape[0] // count, count, *array.shape[1:]), 0, 1)


def with_whitened_patches(state: common.TrainState, images: np.ndarray, mean=None,
                          std=None) -> common.TrainState:
  """``state`` with its patch-whitening layer (``models.WHITEN_LAYER``) computed from the first
  ``WHITENING_IMAGES`` of ``images`` after the classifier's input normalisation (the optimiser
  keeps it fixed: ``classifier.whiten_patches``). Every process gets process 0's kernel."""
  if models.WHITEN_LAYER not in state.params:
    raise ValueError("classifier.whiten_patches needs a classifier with a patch-whitening first "
                     "layer (model.name=airbench93 or airbench94); set it False for this model.")
  current = state.params[models.WHITEN_LAYER]
  mean = model_common.CIFAR10_MEAN if mean is None else mean
  std = model_common.CIFAR10_STD if std is None else std
  normalized = (np.asarray(images[:WHITENING_IMAGES], np.float32) - np.asarray(mean, np.float32)
                ) / np.asarray(std, np.float32)
  kernel = models.whitening_kernel(normalized, patch_size=current.shape[0])
  if jax.process_count() > 1:
    kernel = np.asarray(multihost_utils.broadcast_one_to_all(kernel))
  params = dict(state.params)
  params[models.WHITEN_LAYER] = jnp.asarray(kernel, current.dtype)
  state = state.replace(params=params)
  return with_slow_copy(state) if state.slow is not None else state


LOOKAHEAD_EVERY = 5  # steps between lookahead syncs (airbench's)


def with_slow_copy(state: common.TrainState) -> common.TrainState:
  """``state`` holding a slow copy of its weights (new buffers: the step donates both), for
  ``lookahead``."""
  return state.replace(slow=jax.tree.map(jnp.copy, {"params": state.params,
                                                    "batch_stats": state.batch_stats}))


def lookahead(state: common.TrainState, start_step: int, total_steps: int,
              every: int = LOOKAHEAD_EVERY) -> common.TrainState:
  """airbench's lookahead: every ``every`` steps the slow weights (BatchNorm statistics too)
  move to ``rho * slow + (1 - rho) * fast`` with ``rho = 0.95**every * (step / total)**3`` (fast
  early, averaging hard at the end) and the fast weights are set to them; at the syncs up to the
  first one from ``start_step`` on, the slow weights only take the fast ones. The last step
  syncs too."""
  step = state.step
  sync = (step % every == 0) | (step == total_steps)
  started = step >= start_step + every  # the sync before this one was from start_step on
  fast = {"params": state.params, "batch_stats": state.batch_stats}
  rho = 0.95**every * (step / total_steps) ** 3
  blended = jax.tree.map(lambda s, f: jnp.where(started, rho * s + (1 - rho) * f, f),
                         state.slow, fast)
  slow = jax.tree.map(lambda b, s: jnp.where(sync, b, s), blended, state.slow)
  fast = jax.tree.map(lambda b, f: jnp.where(sync & started, b, f), blended, fast)
  return state.replace(params=fast["params"], batch_stats=fast["batch_stats"], slow=slow)


@functools.partial(jax.jit, static_argnames=("use_augmentation", "accumulation_steps",
                                             "label_smoothing", "crop_padding",
                                             "lookahead_steps", "crop_pad_mode", "adversary",
                                             "steps_per_epoch"),
                   donate_argnums=(0,))
def train_step(state: common.TrainState, images: jnp.ndarray, labels: jnp.ndarray,
               key: jax.Array, use_augmentation: bool, accumulation_steps: int = 1,
               label_smoothing: float = 0.0, crop_padding: int = 4,
               lookahead_steps: tuple[int, int] | None = None,
               crop_pad_mode: str = "constant",
               adversary: tuple[float, float, int, int] | None = None,
               first_epoch_flips: jnp.ndarray | None = None, steps_per_epoch: int = 1
               ) -> tuple[common.TrainState, dict]:
  """One optimiser step on a batch; BatchNorm in training mode. With ``lookahead_steps``
  (start step, total steps) and a ``state.slow`` copy, then a ``lookahead`` sync.

  With ``accumulation_steps`` k > 1 the batch is processed as k microbatches in sequence
  (activations of one microbatch in memory at a time) and their mean gradient makes one update:
  the optimiser sees the whole batch; BatchNorm statistics are those of each microbatch.

  With ``adversary`` (eps, step size, steps, ramp steps), the (augmented) batch is replaced by
  L-inf PGD examples against the current weights (BatchNorm in inference mode; random start):
  PGD adversarial training. Over the first ``ramp steps`` updates eps and the step size grow
  linearly from 1/ramp of their value to all of it (0: full from the start).

  With ``first_epoch_flips`` (the batch's rows of ``augment.first_epoch_flips``), the flips
  alternate between epochs of ``steps_per_epoch`` steps instead of being drawn (airbench's).
  """
  chex.assert_rank(images, 4)
  if use_augmentation:
    flips = None
    if first_epoch_flips is not None:
      flips = augment.alternating_flips(first_epoch_flips, state.step // steps_per_epoch)
    images = augment.random_crop_flip(key, images, crop_padding, crop_pad_mode, flips)
  if adversary is not None:
    eps, step_size, steps, ramp_steps = adversary
    scale = jnp.minimum(1.0, (state.step + 1) / ramp_steps) if ramp_steps else 1.0
    images = pgd_examples(state, images, labels, jax.random.fold_in(key, 1), eps * scale,
                          step_size * scale, steps)

  def loss_fn(params, batch_stats, images, labels):
    logits, updates = state.apply_fn({"params": params, "batch_stats": batch_stats},
                                     images, train=True, mutable=["batch_stats"])
    logits = logits.astype(jnp.float32)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    loss = jnp.mean(losses.cross_entropy(logits, labels, label_smoothing))
    return loss, (accuracy, updates["batch_stats"])

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accumulation_steps == 1:
    (loss, (accuracy, batch_stats)), grads = grad_fn(state.params, state.batch_stats, images,
                                                     labels)
  else:
    def accumulate(carry, microbatch):
      grads_sum, batch_stats = carry
      (loss, (accuracy, batch_stats)), grads = grad_fn(state.params, batch_stats, *microbatch)
      return (jax.tree.map(jnp.add, grads_sum, grads), batch_stats), (loss, accuracy)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, batch_stats), (loss, accuracy) = jax.lax.scan(
        accumulate, (zeros, state.batch_stats),
        (microbatches(images, accumulation_steps), microbatches(labels, accumulation_steps)))
    grads = jax.tree.map(lambda g: g / accumulation_steps, grads)
    loss, accuracy = jnp.mean(loss), jnp.mean(accuracy)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if lookahead_steps is not None:
    state = lookahead(state, *lookahead_steps)
  return state, {"loss": loss, "accuracy": accuracy}


def pgd_examples(state: common.TrainState, images: jnp.ndarray, labels: jnp.ndarray,
                 key: jax.Array, eps: float | jax.Array, step_size: float | jax.Array,
                 steps: int) -> jnp.ndarray:
  """L-inf PGD examples of ``images`` on the cross-entropy of the classifier in ``state``."""
  variables = common.variables_of(state)

  def loss(x):
    logits = state.apply_fn(variables, x, train=False).astype(jnp.float32)
    return losses.cross_entropy(logits, labels)

  return projected_gradient_ascent(loss, images, key, eps=eps, step_size=step_size, steps=steps)


def make_step_fn(use_augmentation: bool, accumulation_steps: int = 1,
                 label_smoothing: float = 0.0, crop_padding: int = 4,
                 lookahead_steps: tuple[int, int] | None = None,
                 crop_pad_mode: str = "constant",
                 adversary: tuple[float, float, int, int] | None = None,
                 steps_per_epoch: int = 1):
  """``train_step`` in the (state, batch, key, frozen) form of ``loop.fit``. A batch is (images,
  labels) or, for alternating flips, (images, labels, first-epoch flips)."""
  def step_fn(state, batch, key, frozen=None):
    del frozen  # the classifier step reads nothing besides its own state
    images, labels, *flips = batch
    flips = jnp.asarray(flips[0]) if flips else None
    return train_step(state, jnp.asarray(images), jnp.asarray(labels), key, use_augmentation,
                      accumulation_steps, float(label_smoothing), int(crop_padding),
                      lookahead_steps, crop_pad_mode, adversary, flips, int(steps_per_epoch))
  return step_fn


def predict(logits_fn, images: np.ndarray, batch_size: int) -> np.ndarray:
  """Predicted classes for many images, batch by batch."""
  return common.apply_in_batches(lambda x: jnp.argmax(logits_fn(x), -1), (images,), batch_size)
