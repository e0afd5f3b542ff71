"""Train state, optimisers, learning-rate schedules and batched application shared by the
training loops."""

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """Flax TrainState plus BatchNorm statistics (an empty dict for models without them)."""

  batch_stats: Any = None
  # Lookahead's slow copy of {"params", "batch_stats"} (classifier.lookahead), else None.
  slow: Any = None


def piecewise_schedule(base_lr: float, steps_per_epoch: int, decay_epochs: Sequence[int],
                       decay_factor: float) -> optax.Schedule:
  """lr = base_lr * decay_factor**k after the k-th of ``decay_epochs``."""
  boundaries = {int(epoch) * steps_per_epoch: decay_factor for epoch in decay_epochs}
  return optax.piecewise_constant_schedule(base_lr, boundaries)


def one_cycle_schedule(peak_lr: float, total_steps: int,
                       warmup_fraction: float) -> optax.Schedule:
  """Linear warm-up from 0 to ``peak_lr`` over ``warmup_fraction`` of ``total_steps``, then
  linear decay to 0 at the last step: a schedule made for short training budgets."""
  total_steps = max(int(total_steps), 1)
  warmup = min(max(int(round(warmup_fraction * total_steps)), 1), total_steps)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak_lr, warmup),
       optax.linear_schedule(peak_lr, 0.0, max(total_steps - warmup, 1))], [warmup])


def schedule(train, steps_per_epoch: int) -> optax.Schedule:
  """The learning-rate schedule of a training section of the config (``classifier`` or
  ``denoiser``): ``piecewise`` (the reference's step decays) or ``one_cycle``."""
  kind = train.get("schedule", "piecewise")
  if kind == "one_cycle":
    return one_cycle_schedule(train.learning_rate, train.num_epochs * steps_per_epoch,
                              train.get("warmup_fraction", 0.2))
  if kind != "piecewise":
    raise ValueError(f"schedule must be piecewise or one_cycle, got {kind!r}.")
  return piecewise_schedule(train.learning_rate, steps_per_epoch, train.lr_decay_epochs,
                            train.lr_decay_factor)


def _sgd_or_adam(name: str, schedule: optax.Schedule, weight_decay: float, momentum: float,
                 nesterov: bool) -> optax.GradientTransformation:
  if name == "sgd":
    base = optax.sgd(schedule, momentum=momentum, nesterov=nesterov)
  elif name == "adam":
    base = optax.adam(schedule)
  else:
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}.")
  return optax.chain(optax.add_decayed_weights(weight_decay), base)


def orthogonalize(matrix: jnp.ndarray, steps: int = 3, eps: float = 1e-7) -> jnp.ndarray:
  """About U V^T for ``matrix`` = U S V^T: the quintic Newton-Schulz iteration of Muon (Jordan
  et al.), whose few steps leave the singular values near 1 (roughly 0.5-1.5), not exactly 1."""
  a, b, c = 3.4445, -4.7750, 2.0315
  wide = matrix.shape[0] <= matrix.shape[1]
  x = matrix if wide else matrix.T
  x = x / (jnp.linalg.norm(x) + eps)
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x if wide else x.T


def normalized_muon(schedule: optax.Schedule, momentum: float = 0.6, nesterov: bool = True,
                    ns_steps: int = 3) -> optax.GradientTransformation:
  """Muon for [kh, kw, in, out] kernels followed by BatchNorm, as airbench94_muon has it: the
  (nesterov) momentum of the gradient, orthogonalised as an [out, kh kw in] matrix, is the
  step, taken after the kernel is rescaled to Frobenius norm sqrt(out) (BatchNorm makes the
  scale irrelevant, so it is held fixed and the learning rate keeps one meaning)."""

  def orthogonalized(updates, params=None):
    del params
    return jax.tree.map(lambda d: orthogonalize(d.reshape(-1, d.shape[-1]).T, ns_steps).T
                        .reshape(d.shape), updates)

  def rescaled_first(updates, params):
    if params is None:
      raise ValueError("normalized_muon needs the parameters: call update(grads, state, params).")
    rescale = lambda p: jnp.sqrt(p.shape[-1]) / (jnp.linalg.norm(p) + 1e-12)
    return jax.tree.map(lambda u, p: (u + p * (rescale(p) - 1)).astype(p.dtype), updates,
                        params)

  return optax.chain(optax.trace(momentum, nesterov),
                     optax.stateless(orthogonalized),
                     optax.scale_by_schedule(lambda step: -schedule(step)),
                     optax.stateless(rescaled_first))


def param_group(path: tuple[str, ...], frozen: Sequence[str], ndim: int = 0,
                muon: bool = False) -> str:
  """``frozen`` (its "/"-joined path is in ``frozen``), ``muon`` (with ``muon``, a 4-D
  convolution kernel), ``norm_bias`` (the bias of a module whose name holds "norm", as
  BatchNorm's) or ``default``."""
  if "/".join(path) in frozen:
    return "frozen"
  if muon and ndim == 4:
    return "muon"
  if path[-1] == "bias" and len(path) > 1 and "norm" in path[-2].lower():
    return "norm_bias"
  return "default"


def make_optimizer(name: str, schedule: optax.Schedule, *, weight_decay: float,
                   momentum: float = 0.9, nesterov: bool = False, frozen: Sequence[str] = (),
                   norm_bias_lr_scale: float = 1.0, muon_lr_scale: float = 1.0,
                   muon_momentum: float = 0.6) -> optax.GradientTransformation:
  """SGD with momentum or Adam, each with coupled L2 weight decay (as torch.optim does); or
  ``muon``: ``normalized_muon`` for convolution kernels (``muon_lr_scale`` times the schedule's
  learning rate, no weight decay) and SGD for the rest.

  Parameters whose path is in ``frozen`` never change. Normalisation biases take
  ``norm_bias_lr_scale`` times the learning rate with the weight decay divided by it, so that
  their decay per step is unchanged (airbench's "bias scaler")."""
  muon = name == "muon"
  base = "sgd" if muon else name
  default = _sgd_or_adam(base, schedule, weight_decay, momentum, nesterov)
  if not frozen and norm_bias_lr_scale == 1.0 and not muon:
    return default
  scaled_schedule = lambda step: norm_bias_lr_scale * schedule(step)
  groups = {"default": default, "frozen": optax.set_to_zero(),
            "norm_bias": _sgd_or_adam(base, scaled_schedule, weight_decay / norm_bias_lr_scale,
                                      momentum, nesterov)}
  if muon:
    groups["muon"] = normalized_muon(lambda step: muon_lr_scale * schedule(step), muon_momentum)
  label = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, leaf: param_group(tuple(str(getattr(key, "key", key)) for key in path),
                                     frozen, jnp.ndim(leaf), muon), params)
  return optax.multi_transform(groups, label)


def create_state(module, key: jax.Array, sample: jnp.ndarray, tx: optax.GradientTransformation,
                 **init_kwargs) -> TrainState:
  """Initialises ``module`` on ``sample`` and wraps it with its optimiser."""
  variables = module.init(key, sample, **init_kwargs)
  return TrainState.create(apply_fn=module.apply, params=variables["params"], tx=tx,
                           batch_stats=variables.get("batch_stats", {}))


def variables_of(state: TrainState) -> dict:
  """The variables dict that ``module.apply`` expects."""
  if state.batch_stats:
    return {"params": state.params, "batch_stats": state.batch_stats}
  return {"params": state.params}


def apply_in_batches(fn: Callable, arrays: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
  """``fn(*rows)`` over consecutive batches of the rows of ``arrays``, joined in numpy."""
  return np.concatenate([np.asarray(fn(*(jnp.asarray(array[start:start + batch_size])
                                         for array in arrays)))
                         for start in range(0, len(arrays[0]), batch_size)])
