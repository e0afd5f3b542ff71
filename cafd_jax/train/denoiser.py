"""Denoiser training: CAFD and the two baselines it is compared with, on the same U-Net.

* CAFD: CAF distance to the natural image plus a relativistic GAN term. The state is a pair
  (denoiser TrainState, discriminator TrainState).
* ``pixel``: mean squared error to the natural image (a plain denoising auto-encoder target).
* ``hgd``: high-level representation guided denoiser (Liao et al. 2018, LGD variant): mean
  absolute difference between the classifier's logits on the denoised and the natural image.
* ``cafd_caf``: CAFD with the paper's loss, the CAF (``weighted_features``) distance, whatever
  ``caf.loss_kind`` the ``cafd`` denoiser uses (the reference code's is plain ``features``).

The target classifier is frozen (BatchNorm in inference mode) throughout.

The natural image's side of each loss (its CAF for CAFD, its logits for HGD) depends on nothing
that trains: ``make_target_fn`` computes it once per stage (``denoiser.precompute_targets``) and
the steps take it as ``natural_target``, which spares one classifier pass per step; without it
a step computes it itself.

With a ``WhiteBoxAdversary`` (``config.denoiser.adversary=white_box``), the CAFD step crafts a
share of each batch's adversarial inputs itself, by L-inf PGD on the cross-entropy of the whole
defended model (classifier after the current denoiser, end to end), in place of the
precomputed CAF examples: the denoiser learns to remove noise made against itself.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from cafd_jax import cam, losses, models
from cafd_jax.attacks.pgd import projected_gradient_ascent
from cafd_jax.models import taps
from cafd_jax.train import common

DenoiserStates = tuple[common.TrainState, common.TrainState]


def caf_options(caf_config, kind: str) -> dict:
  """The ``classifier_caf_fn`` keywords of ``config.caf`` for one CAF kind."""
  return dict(kind=kind, class_source=caf_config.class_source, weights=caf_config.weights,
              feature_layer=caf_config.feature_layer)


def classifier_caf_fn(classifier: nn.Module, classifier_variables: dict, kind: str,
                      class_source: str, weights: str = "cam",
                      feature_layer: str = taps.DEFAULT_LAYER, upsample: bool = True) -> cam.CafFn:
  """CAF of a frozen classifier (inference-mode BatchNorm) at ``feature_layer``, upsampled to
  the input size unless ``upsample=False`` (see ``cam.make_caf_fn``)."""
  params = classifier_variables["params"]
  head_kernel = None
  if kind != "features" and weights == "cam":
    if feature_layer != taps.DEFAULT_LAYER:
      raise ValueError(f"caf.weights=cam weighs the features at {taps.DEFAULT_LAYER!r}; use "
                       f"gradcam or gradcampp for caf.feature_layer={feature_layer!r}.")
    head_kernel = models.head_kernel(params)
  tapped_apply = taps.tapped_apply_fn(classifier, classifier_variables, feature_layer)
  return cam.make_caf_fn(tapped_apply, kind, class_source, weights, head_kernel, upsample)


@dataclasses.dataclass(frozen=True)
class WhiteBoxAdversary:
  """Online white-box examples: L-inf PGD (``steps`` of ``step_size`` within ``eps``, random
  start) on the defended model's cross-entropy, for the first ``fraction`` of each batch."""
  eps: float
  step_size: float
  steps: int
  fraction: float = 1.0

  def count(self, batch_size: int) -> int:
    """How many examples of a batch are crafted online (at least one)."""
    return max(1, min(batch_size, round(self.fraction * batch_size)))


def white_box_examples(denoiser_state: common.TrainState, classifier: nn.Module,
                       classifier_variables: dict, x_natural: jnp.ndarray, labels: jnp.ndarray,
                       key: jax.Array, adversary: WhiteBoxAdversary) -> jnp.ndarray:
  """PGD examples of ``x_natural`` against classifier(denoiser(x)), gradients through both
  (inference mode, the denoiser's current parameters)."""
  denoiser_variables = {"params": denoiser_state.params, "batch_stats": denoiser_state.batch_stats}

  def defended_loss(images):
    denoised = denoiser_state.apply_fn(denoiser_variables, images, train=False)
    logits = classifier.apply(classifier_variables, denoised).astype(jnp.float32)
    return losses.cross_entropy(logits, labels)

  return projected_gradient_ascent(defended_loss, x_natural, key, eps=adversary.eps,
                                   step_size=adversary.step_size, steps=adversary.steps)


def make_target_fn(classifier: nn.Module, name: str, caf_kind: str | None = None,
                   class_source: str = "prediction", weights: str = "cam",
                   feature_layer: str = taps.DEFAULT_LAYER) -> Callable | None:
  """A jitted ``target(classifier_variables, x_natural, labels)``: what the loss of denoiser
  ``name`` compares the denoised image with on the classifier's side (``hgd``: the natural
  image's logits; with a ``caf_kind``, CAFD's: its CAF of that kind at the features' size);
  None when there is nothing to precompute (``pixel``, whose target is the image itself, or a
  loss this does not know: its step computes what it needs)."""
  if name == "hgd":
    return jax.jit(lambda variables, x_natural, labels: classifier.apply(variables, x_natural))
  if caf_kind is None:
    return None

  def target(classifier_variables, x_natural, labels):
    return classifier_caf_fn(classifier, classifier_variables, caf_kind, class_source, weights,
                             feature_layer, upsample=False)(x_natural, labels)

  return jax.jit(target)


def make_train_step(classifier: nn.Module, *, caf_kind: str, class_source: str,
                    caf_weight: float, gan_weight: float, weights: str = "cam",
                    feature_layer: str = taps.DEFAULT_LAYER,
                    adversary: WhiteBoxAdversary | None = None) -> Callable:
  """A jitted ``step(states, classifier_variables, x_adv, x_natural, labels, key=None,
  natural_target=None)``; ``weights`` and ``feature_layer`` choose the CAF's class weights and
  features (``classifier_caf_fn``); ``natural_target`` is the natural images' CAF from
  ``make_target_fn`` with the same options (computed here when None). With an ``adversary``,
  the first ``adversary.count(batch)`` examples of ``x_adv`` are replaced by white-box examples
  crafted with ``key``."""

  def step(states: DenoiserStates, classifier_variables: dict, x_adv: jnp.ndarray,
           x_natural: jnp.ndarray, labels: jnp.ndarray, key: jax.Array | None = None,
           natural_target: jnp.ndarray | None = None) -> tuple[DenoiserStates, dict]:
    denoiser_state, disc_state = states
    metrics = {}
    if adversary is not None:
      if key is None:
        raise ValueError("a white-box adversary needs the step's PRNG key")
      count = adversary.count(x_adv.shape[0])
      online = white_box_examples(denoiser_state, classifier, classifier_variables,
                                  x_natural[:count], labels[:count], key, adversary)
      x_adv = jnp.concatenate([online.astype(x_adv.dtype), x_adv[count:]])
      metrics["online_linf"] = jnp.max(jnp.abs(online - x_natural[:count]))
    caf_fn = classifier_caf_fn(classifier, classifier_variables, caf_kind, class_source, weights,
                               feature_layer, upsample=False)
    natural_caf = jax.lax.stop_gradient(
        caf_fn(x_natural, labels) if natural_target is None else natural_target)
    real_logits = disc_state.apply_fn({"params": disc_state.params}, x_natural)

    def denoiser_loss(params):
      denoised, updates = denoiser_state.apply_fn(
          {"params": params, "batch_stats": denoiser_state.batch_stats}, x_adv, train=True,
          mutable=["batch_stats"])
      caf_loss = jnp.mean(cam.caf_distance(caf_fn(denoised, labels), natural_caf,
                                           x_natural.shape[1:3]))
      fake_logits = disc_state.apply_fn({"params": disc_state.params}, denoised)
      gan_loss = losses.relativistic_generator_loss(jax.lax.stop_gradient(real_logits), fake_logits)
      total = caf_weight * caf_loss + gan_weight * gan_loss
      return total, (denoised, updates["batch_stats"], caf_loss, gan_loss)

    (total, (denoised, batch_stats, caf_loss, gan_loss)), grads = jax.value_and_grad(
        denoiser_loss, has_aux=True)(denoiser_state.params)
    denoised = jax.lax.stop_gradient(denoised)

    def discriminator_loss(params):
      real = disc_state.apply_fn({"params": params}, x_natural)
      fake = disc_state.apply_fn({"params": params}, denoised)
      return losses.relativistic_discriminator_loss(real, fake)

    disc_loss, disc_grads = jax.value_and_grad(discriminator_loss)(disc_state.params)
    new_states = (denoiser_state.apply_gradients(grads=grads, batch_stats=batch_stats),
                  disc_state.apply_gradients(grads=disc_grads))
    pixel_mse = jnp.mean((denoised - x_natural) ** 2)
    return new_states, {"loss": total, "caf_loss": caf_loss, "gan_loss": gan_loss,
                        "disc_loss": disc_loss, "pixel_mse": pixel_mse, **metrics}

  return jax.jit(step, donate_argnums=(0,))


BASELINES = ("pixel", "hgd")
CAF_LOSS_DENOISER = "cafd_caf"  # CAFD trained with the paper's CAF loss
CAF_LOSS_KIND = "weighted_features"


def baseline_loss(classifier: nn.Module, classifier_variables: dict, name: str,
                  denoised: jnp.ndarray, x_natural: jnp.ndarray,
                  natural_target: jnp.ndarray | None = None) -> jnp.ndarray:
  """The scalar training loss of a baseline denoiser (see module docstring); ``natural_target``
  is ``make_target_fn``'s (computed here when None)."""
  if name == "pixel":
    return jnp.mean(losses.per_example_mse(denoised, x_natural))
  if name == "hgd":
    logits = lambda images: classifier.apply(classifier_variables, images)
    target = jax.lax.stop_gradient(logits(x_natural) if natural_target is None
                                   else natural_target)
    return jnp.mean(jnp.abs(logits(denoised) - target))
  raise ValueError(f"unknown baseline denoiser {name!r}; choose from {BASELINES}")


def make_baseline_train_step(classifier: nn.Module, name: str) -> Callable:
  """A jitted ``step(state, classifier_variables, x_adv, x_natural, labels, key=None,
  natural_target=None)`` for a baseline."""

  def step(state: common.TrainState, classifier_variables: dict, x_adv: jnp.ndarray,
           x_natural: jnp.ndarray, labels: jnp.ndarray, key: jax.Array | None = None,
           natural_target: jnp.ndarray | None = None) -> tuple[common.TrainState, dict]:
    del labels, key  # the baselines need no class and draw nothing

    def loss_fn(params):
      denoised, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                         x_adv, train=True, mutable=["batch_stats"])
      loss = baseline_loss(classifier, classifier_variables, name, denoised, x_natural,
                           natural_target)
      return loss, (denoised, updates["batch_stats"])

    (loss, (denoised, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    pixel_mse = jnp.mean((jax.lax.stop_gradient(denoised) - x_natural) ** 2)
    return (state.apply_gradients(grads=grads, batch_stats=batch_stats),
            {"loss": loss, "pixel_mse": pixel_mse})

  return jax.jit(step, donate_argnums=(0,))


def make_step_fn(train_step: Callable):
  """A denoiser train step in the (state, batch, key, frozen) form of ``loop.fit``; ``frozen`` is
  the classifier's variables; a batch is (x_adv, x_natural, labels) or, with the natural
  images' targets precomputed, (x_adv, x_natural, labels, natural_target)."""
  def step_fn(states, batch, key, classifier_variables):
    x_adv, x_natural, labels, *target = batch
    return train_step(states, classifier_variables, jnp.asarray(x_adv), jnp.asarray(x_natural),
                      jnp.asarray(labels), key, jnp.asarray(target[0]) if target else None)
  return step_fn
