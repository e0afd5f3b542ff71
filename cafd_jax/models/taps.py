"""Reading, and perturbing, any intermediate of a Flax classifier by its module path.

A layer is named ``"PATH"`` (the output of the submodule at that path, e.g. ``"BasicBlock_5"``
or ``"stage2/block1"``) or ``"PATH:input"`` (its first argument, e.g. ``"head:input"``: the
features a GAP + dense head pools). Method interception (``nn.intercept_methods``) reads the
value, and adds a perturbation to it when one is given: the gradient of the logits with respect
to a zero perturbation is their gradient with respect to that intermediate (Grad-CAM). Works for
any Flax module, without changing its parameters.
"""

from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

DEFAULT_LAYER = "head:input"  # the last conv features of every classifier in the zoo
SIDES = ("output", "input")

TappedApply = Callable[[jnp.ndarray, jnp.ndarray | None], tuple[jnp.ndarray, jnp.ndarray]]


def parse_layer(layer: str) -> tuple[str, str]:
  """``"PATH"`` or ``"PATH:input"`` -> (path, side)."""
  path, _, side = layer.partition(":")
  side = side or "output"
  if not path or side not in SIDES:
    raise ValueError(f"caf.feature_layer must be 'MODULE_PATH' or 'MODULE_PATH:input' "
                     f"(e.g. {DEFAULT_LAYER!r}), got {layer!r}.")
  return path, side


def module_paths(model: nn.Module, variables: dict, images: jnp.ndarray) -> list[str]:
  """The submodule paths a forward pass calls, in call order (to name a layer)."""
  paths = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and context.module.path:
      path = "/".join(context.module.path)
      if path not in paths:
        paths.append(path)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):  # variables may be arrays or jax.ShapeDtypeStructs
    jax.eval_shape(model.apply, variables, images)
  return paths


def apply_tapped(model: nn.Module, variables: dict, images: jnp.ndarray, layer: str,
                 perturbation: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Inference forward pass: (logits, the value at ``layer`` [+ perturbation])."""
  path, side = parse_layer(layer)
  captured = []

  def tap(next_fun, args, kwargs, context):
    if context.method_name != "__call__" or "/".join(context.module.path) != path:
      return next_fun(*args, **kwargs)
    if side == "input":
      value = args[0] if perturbation is None else args[0] + perturbation.astype(args[0].dtype)
      captured.append(value)
      return next_fun(value, *args[1:], **kwargs)
    value = next_fun(*args, **kwargs)
    value = value if perturbation is None else value + perturbation.astype(value.dtype)
    captured.append(value)
    return value

  with nn.intercept_methods(tap):
    logits = model.apply(variables, images)
  if len(captured) != 1:
    raise ValueError(
        f"caf.feature_layer {layer!r}: module {path!r} was called {len(captured)} times in a "
        f"forward pass; name one called once (see taps.module_paths), e.g. {DEFAULT_LAYER!r}.")
  return logits, captured[0]


def tapped_apply_fn(model: nn.Module, variables: dict, layer: str) -> TappedApply:
  """``fn(images, perturbation) -> (logits, features)`` for a frozen classifier."""
  return lambda images, perturbation=None: apply_tapped(model, variables, images, layer,
                                                        perturbation)
