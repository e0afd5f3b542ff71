"""Robust accuracy of defended classifiers: attacks x defenses under a threat model.

Threat model ``unseen`` (the paper's main setting): the attack sees only the bare classifier;
its adversarial examples are then classified behind each defense.
"""

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from cafd_jax import attacks, data
from cafd_jax.attacks import registry
from cafd_jax.train import denoiser as denoiser_train

ATTACKS = ("none", "caf") + tuple(registry.ATTACKS)
DEFENSES = ("none", "cafd")
LogitsFn = Callable[[jnp.ndarray], jnp.ndarray]


def logits_fn(classifier: nn.Module, variables: dict) -> LogitsFn:
  """Inference-mode logits of a classifier."""
  return lambda images: classifier.apply(variables, images)


def bind(jitted: Callable, variables: Any) -> Callable:
  """``jitted(variables, *args)`` as a function of ``*args``.

  Model variables travel as jit arguments rather than closure constants, so large models are
  not baked into every compiled program.
  """
  return functools.partial(jitted, variables)


def defense_predictors(names: Sequence[str], classifier: nn.Module, denoiser: nn.Module | None
                       ) -> dict[str, Callable]:
  """For each defense, a jitted ``predict(variables, images) -> classes``.

  ``variables`` is ``{"classifier": ..., "denoiser": ...}``.
  """
  def undefended(variables, images):
    return classifier.apply(variables["classifier"], images)

  def cafd(variables, images):
    return undefended(variables, denoiser.apply(variables["denoiser"], images))

  table = {"none": undefended, "cafd": cafd}
  return {name: jax.jit(lambda v, x, fn=table[name]: jnp.argmax(fn(v, x), -1)) for name in names}


def caf_attack(config: ml_collections.ConfigDict, classifier: nn.Module, params: dict) -> Callable:
  """A jitted ``attack(classifier_variables, x, y, key)``: the CAF attack with ``params``."""

  def attack(variables, x, y, key):
    caf_fn = denoiser_train.classifier_caf_fn(classifier, variables, config.caf.attack_kind,
                                              config.caf.class_source)
    return attacks.caf_attack(caf_fn, x, y, key, **params)

  return jax.jit(attack)


def build_attack(name: str, config: ml_collections.ConfigDict, classifier: nn.Module) -> Callable:
  """A jitted ``attack(classifier_variables, x, y, key) -> x_adv`` that sees only the classifier
  (the unseen threat model); parameters from ``config.eval.<name>``, else the attack's defaults."""
  if name == "none":
    return lambda variables, x, y, key: x
  if name == "caf":
    return caf_attack(config, classifier, dict(config.eval.caf))
  if name in registry.ATTACKS:
    params = dict(config.eval[name]) if name in config.eval else {}
    attack = registry.get(name)
    return jax.jit(lambda variables, x, y, key: attack(logits_fn(classifier, variables), x, y, key,
                                                       **params))
  raise ValueError(f"eval.attacks: unknown attack {name!r}; choose from {ATTACKS}.")


def evaluate_unseen(config: ml_collections.ConfigDict, dataset: data.Dataset,
                    classifier: nn.Module, denoiser: nn.Module | None, variables: dict,
                    defense_names: Sequence[str], attack_names: Sequence[str], key: jax.Array,
                    log: Callable[[str], None] = print) -> list[dict]:
  """Accuracy of every defense on adversarial examples crafted against the bare classifier.

  ``variables`` is ``{"classifier": ..., "denoiser": ...}`` (the denoiser only if a defense
  needs it).
  """
  batch_size = config.eval.batch_size
  predictors = defense_predictors(defense_names, classifier, denoiser)
  results = []
  for attack_index, attack_name in enumerate(attack_names):
    attack = build_attack(attack_name, config, classifier)
    correct = {name: 0 for name in defense_names}
    for batch_index, start in enumerate(range(0, len(dataset), batch_size)):
      x = jnp.asarray(dataset.images[start:start + batch_size])
      y = jnp.asarray(dataset.labels[start:start + batch_size])
      batch_key = jax.random.fold_in(jax.random.fold_in(key, attack_index), batch_index)
      x_adv = attack(variables["classifier"], x, y, batch_key)
      for name in defense_names:
        correct[name] += int(jnp.sum(predictors[name](variables, x_adv) == y))
    for name in defense_names:
      accuracy = correct[name] / len(dataset)
      results.append({"attack": attack_name, "defense": name, "threat_model": "unseen",
                      "accuracy": accuracy, "n": len(dataset)})
      log(f"[evaluate] attack {attack_name:>5}  defense {name:>5}  accuracy {accuracy:.4f}  "
          f"(n={len(dataset)})")
  return results
