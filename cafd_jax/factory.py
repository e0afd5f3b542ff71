"""Builds models and train states from a config: the one place that reads model fields."""

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from cafd_jax import imported, models
from cafd_jax.train import classifier as classifier_train
from cafd_jax.train import common


def training_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
  """The compute dtype of the train steps (``config.compute_dtype``); crafting, attacks and
  evaluation always compute in float32, so that low precision cannot mask gradients."""
  return jnp.dtype(config.get("compute_dtype", "float32"))


def classifier(config: ml_collections.ConfigDict, num_classes: int,
               dtype: jnp.dtype = jnp.float32) -> nn.Module:
  """The zoo classifier of ``config.model``, or the user's (``import:...``, its own dtype)."""
  model = config.model
  if imported.is_imported(model.name):
    return imported.build(model.name, num_classes)
  return models.create_classifier(model.name, num_classes=num_classes, width=model.width,
                                  mean=model.mean, std=model.std, depth=model.depth,
                                  widen_factor=model.widen_factor,
                                  head=model.head, logit_scale=model.get("logit_scale", 1.0),
                                  whiten_padding=model.get("whiten_padding", "valid"),
                                  dtype=dtype)


def denoiser(config: ml_collections.ConfigDict,
             dtype: jnp.dtype = jnp.float32) -> models.UNetDenoiser:
  return models.UNetDenoiser(width=config.denoiser.width, dtype=dtype)


def discriminator(config: ml_collections.ConfigDict) -> models.Discriminator:
  return models.Discriminator(base_channels=32, width=config.denoiser.discriminator_width)


def sample_images(config: ml_collections.ConfigDict) -> jnp.ndarray:
  """One blank image batch of the config's size: what models are initialised on."""
  size = config.data.image_size
  return jnp.zeros((1, size, size, 3), jnp.float32)


def classifier_state(config: ml_collections.ConfigDict, num_classes: int, key: jax.Array,
                     steps_per_epoch: int, dtype: jnp.dtype = jnp.float32) -> common.TrainState:
  """Fresh classifier TrainState with the config's optimiser and schedule (float32 parameters;
  ``dtype`` is the compute dtype of its ``apply_fn``)."""
  train = config.classifier
  tx = common.make_optimizer(train.optimizer, common.schedule(train, steps_per_epoch),
                             weight_decay=train.weight_decay,
                             momentum=train.momentum, nesterov=train.nesterov,
                             frozen=(models.WHITEN_LAYER,) if train.get("whiten_patches") else (),
                             norm_bias_lr_scale=train.get("norm_bias_lr_scale", 1.0),
                             muon_lr_scale=train.get("muon_learning_rate", 0.0) / train.learning_rate,
                             muon_momentum=train.get("muon_momentum", 0.6))
  state = common.create_state(classifier(config, num_classes, dtype), key, sample_images(config),
                              tx)
  if train.get("lookahead"):
    state = classifier_train.with_slow_copy(state)
  return state


def _denoiser_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
  train = config.denoiser
  return common.make_optimizer("adam", common.schedule(train, steps_per_epoch),
                               weight_decay=train.weight_decay)


def baseline_denoiser_state(config: ml_collections.ConfigDict, key: jax.Array,
                            steps_per_epoch: int, dtype: jnp.dtype = jnp.float32
                            ) -> common.TrainState:
  """Fresh TrainState of a baseline denoiser: CAFD's U-Net, optimiser and schedule."""
  return common.create_state(denoiser(config, dtype), key, sample_images(config),
                             _denoiser_optimizer(config, steps_per_epoch))


def denoiser_states(config: ml_collections.ConfigDict, key: jax.Array, steps_per_epoch: int,
                    dtype: jnp.dtype = jnp.float32
                    ) -> tuple[common.TrainState, common.TrainState]:
  """Fresh (denoiser, discriminator) TrainStates, both Adam with the denoiser's schedule."""
  denoiser_key, disc_key = jax.random.split(key)
  make_tx = lambda: _denoiser_optimizer(config, steps_per_epoch)
  return (common.create_state(denoiser(config, dtype), denoiser_key, sample_images(config), make_tx()),
          common.create_state(discriminator(config), disc_key, sample_images(config), make_tx()))
