"""Shared pieces of the cross-checks: a small trained model, its PyTorch twin, accuracies.

Only the cross-check tests import this module; it needs torch (test-only dependency).
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

from cafd_jax import data, models
from cafd_jax.models import vgg
from cafd_jax.train import classifier, common, loop

LAYOUT = "vgg_tiny"
WIDTH = 0.25
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
NUM_TEST = 500


def train_model(num_train: int = 2000, epochs: int = 3, seed: int = 0):
  """vgg_tiny trained on synthetic shapes: (model, variables, x_test [500], y_test [500])."""
  train_set = data.make_synthetic(num_train, seed=seed + 11)
  test_set = data.make_synthetic(NUM_TEST, seed=seed + 12)
  model = models.create_classifier(LAYOUT, num_classes=10, width=WIDTH, mean=MEAN, std=STD)
  tx = common.make_optimizer("adam", 2e-3, weight_decay=0.0)
  state = common.create_state(model, jax.random.key(seed), train_set.images[:1], tx)
  step = classifier.make_step_fn(use_augmentation=False)
  for epoch in range(epochs):
    order = loop.epoch_order(len(train_set), seed, epoch)
    for start in range(0, len(order) - 49, 50):
      batch = order[start:start + 50]
      state, _ = step(state, (train_set.images[batch], train_set.labels[batch]),
                      jax.random.key(epoch))
  return model, common.variables_of(state), test_set.images, test_set.labels


class TorchVGG(torch.nn.Module):
  """The same network in PyTorch (NCHW), built from Flax variables."""

  def __init__(self, variables):
    super().__init__()
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    stats = jax.tree_util.tree_map(np.asarray, variables["batch_stats"])
    self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
    self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))
    layers, conv_index = [], 0
    for item in vgg.LAYOUTS[LAYOUT]:
      if item == "M":
        layers.append(torch.nn.MaxPool2d(2))
        continue
      kernel = params[f"Conv3x3_{conv_index}"]["kernel"]  # [3, 3, in, out]
      conv = torch.nn.Conv2d(kernel.shape[2], kernel.shape[3], 3, padding=1)
      conv.weight.data = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
      conv.bias.data = torch.from_numpy(params[f"Conv3x3_{conv_index}"]["bias"].copy())
      norm = torch.nn.BatchNorm2d(kernel.shape[3], eps=1e-5)
      bn_params, bn_stats = params[f"BatchNorm_{conv_index}"], stats[f"BatchNorm_{conv_index}"]
      norm.weight.data = torch.from_numpy(bn_params["scale"].copy())
      norm.bias.data = torch.from_numpy(bn_params["bias"].copy())
      norm.running_mean.data = torch.from_numpy(bn_stats["mean"].copy())
      norm.running_var.data = torch.from_numpy(bn_stats["var"].copy())
      layers += [conv, norm, torch.nn.ReLU()]
      conv_index += 1
    self.features = torch.nn.Sequential(*layers)
    dense = params["head"]["dense"]
    self.head = torch.nn.Linear(*dense["kernel"].shape)
    self.head.weight.data = torch.from_numpy(dense["kernel"].T.copy())
    self.head.bias.data = torch.from_numpy(dense["bias"].copy())
    self.eval()

  def forward(self, x):
    h = self.features((x - self.mean) / self.std)
    return self.head(h.mean(dim=(2, 3)))


def to_nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def to_nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().cpu().numpy().transpose(0, 2, 3, 1)


@functools.lru_cache(maxsize=None)
def _jitted_attack(attack: Callable, apply_fn: Callable, frozen_params: tuple):
  params = dict(frozen_params)

  def run(variables, x, y, key):
    return attack(functools.partial(apply_fn, variables), x, y, key, **params)

  return jax.jit(run)


def run_ours(attack: Callable, model, variables, x, y, seed: int = 0, batch_size: int = 250,
             **params) -> np.ndarray:
  """Our attack in batches (one compilation), returned as NHWC numpy."""
  run = _jitted_attack(attack, model.apply, tuple(sorted(params.items())))
  key = jax.random.key(seed)
  parts = []
  for start in range(0, len(x), batch_size):
    key, sub = jax.random.split(key)
    parts.append(np.asarray(run(variables, jnp.asarray(x[start:start + batch_size]),
                                jnp.asarray(y[start:start + batch_size]), sub)))
  return np.concatenate(parts)


def accuracy_jax(model, variables, x, y) -> float:
  logits = jax.jit(model.apply)(variables, jnp.asarray(x))
  return float(np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(y)))


def robust_accuracy_l2(model, variables, x, x_adv, y, eps: float) -> float:
  """Minimal-norm attacks scored as foolbox does: the perturbation is scaled down into the L2
  ball of radius eps, and the example counts as robust if that point is classified correctly."""
  x, x_adv = np.asarray(x), np.asarray(x_adv)
  delta = (x_adv - x).reshape(len(x), -1)
  norms = np.linalg.norm(delta, axis=1)
  scale = np.minimum(1.0, eps / np.maximum(norms, 1e-12))
  clipped = x + (delta * scale[:, None]).reshape(x.shape)
  return accuracy_jax(model, variables, clipped, y)
