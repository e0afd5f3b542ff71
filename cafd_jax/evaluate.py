"""Robust accuracy of defended classifiers: attacks x defenses under a threat model.

Threat model ``unseen`` (the paper's main setting): the attack sees only the bare classifier;
its adversarial examples are then classified behind each defense.
"""

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from cafd_jax import attacks, data
from cafd_jax.train import denoiser as denoiser_train

ATTACKS = ("none", "pgd", "caf")
DEFENSES = ("none", "cafd")
LogitsFn = Callable[[jnp.ndarray], jnp.ndarray]
AttackFn = Callable[[jnp.ndarray, jnp.ndarray, jax.Array], jnp.ndarray]


def logits_fn(classifier: nn.Module, variables: dict) -> LogitsFn:
  """Inference-mode logits of a classifier."""
  return lambda images: classifier.apply(variables, images)


def purify_fn(denoiser: nn.Module, variables: dict) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """Inference-mode denoiser."""
  return lambda images: denoiser.apply(variables, images)


def defenses(names: Sequence[str], classify: LogitsFn, purify) -> dict[str, LogitsFn]:
  """Each defense as a logits function over raw pixels."""
  table = {"none": classify, "cafd": lambda images: classify(purify(images))}
  return {name: table[name] for name in names}


def build_attack(name: str, config: ml_collections.ConfigDict, classifier: nn.Module,
                 variables: dict) -> AttackFn:
  """A jitted ``attack(x, y, key) -> x_adv`` against the bare classifier (unseen threat model)."""
  if name == "none":
    return lambda x, y, key: x
  if name == "pgd":
    params = dict(config.eval.pgd)
    return jax.jit(lambda x, y, key: attacks.pgd(logits_fn(classifier, variables), x, y, key,
                                                 **params))
  if name == "caf":
    params = dict(config.eval.caf)
    caf_fn = denoiser_train.classifier_caf_fn(classifier, variables, config.caf.attack_kind,
                                              config.caf.class_source)
    return jax.jit(lambda x, y, key: attacks.caf_attack(caf_fn, x, y, key, **params))
  raise ValueError(f"eval.attacks: unknown attack {name!r}; choose from {ATTACKS}.")


def evaluate_unseen(config: ml_collections.ConfigDict, dataset: data.Dataset,
                    classifier: nn.Module, classifier_variables: dict,
                    defense_fns: dict[str, LogitsFn], attack_names: Sequence[str],
                    key: jax.Array, log: Callable[[str], None] = print) -> list[dict]:
  """Accuracy of every defense on adversarial examples crafted against the bare classifier."""
  batch_size = config.eval.batch_size
  predict = {name: jax.jit(lambda x, fn=fn: jnp.argmax(fn(x), -1)) for name, fn in defense_fns.items()}
  results = []
  for attack_index, attack_name in enumerate(attack_names):
    attack = build_attack(attack_name, config, classifier, classifier_variables)
    correct = {name: 0 for name in defense_fns}
    for batch_index, start in enumerate(range(0, len(dataset), batch_size)):
      x = jnp.asarray(dataset.images[start:start + batch_size])
      y = jnp.asarray(dataset.labels[start:start + batch_size])
      batch_key = jax.random.fold_in(jax.random.fold_in(key, attack_index), batch_index)
      x_adv = attack(x, y, batch_key)
      for name in defense_fns:
        correct[name] += int(jnp.sum(predict[name](x_adv) == y))
    for name in defense_fns:
      accuracy = correct[name] / len(dataset)
      results.append({"attack": attack_name, "defense": name, "threat_model": "unseen",
                      "accuracy": accuracy, "n": len(dataset)})
      log(f"[evaluate] attack {attack_name:>5}  defense {name:>5}  accuracy {accuracy:.4f}  "
          f"(n={len(dataset)})")
  return results
