"""Target-classifier training: cross-entropy, SGD or Adam, optional crop+flip augmentation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cafd_jax import augment, losses
from cafd_jax.train import common


@functools.partial(jax.jit, static_argnames=("use_augmentation",), donate_argnums=(0,))
def train_step(state: common.TrainState, images: jnp.ndarray, labels: jnp.ndarray,
               key: jax.Array, use_augmentation: bool) -> tuple[common.TrainState, dict]:
  """One SGD step on a batch; BatchNorm in training mode."""
  if use_augmentation:
    images = augment.random_crop_flip(key, images)

  def loss_fn(params):
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                     images, train=True, mutable=["batch_stats"])
    return jnp.mean(losses.cross_entropy(logits, labels)), (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return state, {"loss": loss, "accuracy": accuracy}


def make_step_fn(use_augmentation: bool):
  """Adapts ``train_step`` to the (state, batch, key) signature of ``loop.fit``."""
  def step_fn(state, batch, key):
    images, labels = batch
    return train_step(state, jnp.asarray(images), jnp.asarray(labels), key, use_augmentation)
  return step_fn


def predict(logits_fn, images: np.ndarray, batch_size: int) -> np.ndarray:
  """Predicted classes for many images, batch by batch."""
  return np.concatenate([np.asarray(jnp.argmax(logits_fn(jnp.asarray(images[i:i + batch_size])), -1))
                         for i in range(0, len(images), batch_size)])
