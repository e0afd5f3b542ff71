"""Classifiers from outside the zoo: a user's Flax model by import path, and trained variables
read from a file.

``model.name = "import:package.module:factory"`` names a callable ``factory(num_classes=K)``
returning an ``nn.Module`` whose ``__call__(images, train=False)`` maps NHWC pixels in [0, 1]
to logits (``train=True`` and a ``batch_stats`` collection if it has BatchNorm, for
fine-tuning). For CAM it ends in ``cafd_jax.models.common.GapDenseHead(K, name="head")``;
otherwise ``caf.weights=gradcam`` (or ``gradcampp``) with ``caf.feature_layer`` naming a
layer. ``classifier.init_from`` reads its trained variables.
"""

import importlib
from typing import Any, Callable

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

from cafd_jax import checkpoint, config_checks, io_utils
from cafd_jax.models import common, taps

PREFIX = "import:"


def is_imported(name: str) -> bool:
  return name.startswith(PREFIX)


def load_factory(name: str) -> Callable[..., nn.Module]:
  """The factory named ``import:package.module:factory``; ConfigError saying what is wrong."""
  module_name, _, attribute = name[len(PREFIX):].partition(":")
  if not module_name or not attribute:
    raise config_checks.ConfigError(
        f"config.model.name={name!r}: write import:package.module:factory, e.g. "
        f"import:examples.small_cnn:make.")
  try:
    module = importlib.import_module(module_name)
  except Exception as error:  # pylint: disable=broad-except  # the user's module: anything
    raise config_checks.ConfigError(
        f"config.model.name={name!r}: cannot import {module_name} ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}); put it on PYTHONPATH.") from None
  factory = getattr(module, attribute, None)
  if not callable(factory):
    raise config_checks.ConfigError(
        f"config.model.name={name!r}: {module_name} has no callable {attribute!r}.")
  return factory


def build(name: str, num_classes: int) -> nn.Module:
  model = load_factory(name)(num_classes=num_classes)
  if not isinstance(model, nn.Module):
    raise config_checks.ConfigError(
        f"config.model.name={name!r} returned a {type(model).__name__}, not a flax nn.Module.")
  return model


def check_caf_layer(config: ml_collections.ConfigDict, model: nn.Module,
                    variables: dict) -> None:
  """ConfigError unless the CAF settings fit ``model``: CAM needs its GAP + dense head named
  ``head``; any weights need ``caf.feature_layer`` to be one of its module paths."""
  sample = jnp.zeros((1, config.data.image_size, config.data.image_size, 3), jnp.float32)
  paths = taps.module_paths(model, variables, sample)
  shown = ", ".join(paths[-6:])
  if config.caf.weights == "cam" and not common.has_gap_dense_head(variables.get("params", {})):
    raise config_checks.ConfigError(
        f"config.model.name={config.model.name!r} has no GAP + dense head named 'head' "
        f"(cafd_jax.models.common.GapDenseHead), so no CAM; set --config.caf.weights=gradcam "
        f"and --config.caf.feature_layer=LAYER (its last layers: {shown}).")
  path, _ = taps.parse_layer(config.caf.feature_layer)
  if path not in paths:
    raise config_checks.ConfigError(
        f"config.caf.feature_layer={config.caf.feature_layer!r} is not a layer of "
        f"{config.model.name!r}; its last layers: {shown}.")


def _newest_step(folder):
  """A stage's checkpoint folder (numbered steps, e.g. DIR/checkpoints/classifier): its newest
  step's item; any other folder as it is."""
  steps = [child for child in folder.iterdir() if child.name.isdigit() and child.is_dir()]
  if not steps:
    return folder
  newest = max(steps, key=lambda child: int(child.name))
  return newest / "default" if (newest / "default").is_dir() else newest


def read_variables(path: str) -> dict:
  """Variables ({"params": ..., "batch_stats": ...}) from an Orbax checkpoint folder (of the
  variables, of a TrainState holding them, or a run's stage folder such as
  ``DIR/checkpoints/classifier``: its newest step) or a Flax msgpack file."""
  source = io_utils.path(path)
  if not source.exists():
    raise checkpoint.CheckpointError(f"config.classifier.init_from: {path} does not exist.")
  try:
    if source.is_dir():
      tree = ocp.StandardCheckpointer().restore(io_utils.absolute(_newest_step(source)))
    else:
      tree = flax.serialization.msgpack_restore(source.read_bytes())
  except Exception as error:  # pylint: disable=broad-except  # many formats, many errors
    raise checkpoint.CheckpointError(
        f"config.classifier.init_from: cannot read {path} as an Orbax checkpoint folder or a "
        f"Flax msgpack file ({type(error).__name__}).") from None
  if not isinstance(tree, dict) or "params" not in tree:
    raise checkpoint.CheckpointError(
        f"config.classifier.init_from: {path} holds no 'params'; save the model's variables "
        f"(flax.serialization.to_bytes(variables)).")
  return {name: tree[name] for name in ("params", "batch_stats") if tree.get(name)}


def with_variables(state: Any, variables: dict, source: str) -> Any:
  """``state`` with its params and batch_stats replaced by ``variables`` (same tree, shapes)."""
  for collection, current in (("params", state.params), ("batch_stats", state.batch_stats)):
    loaded = variables.get(collection, {})
    want = {jax.tree_util.keystr(p): np.shape(v)
            for p, v in jax.tree_util.tree_leaves_with_path(current)}
    got = {jax.tree_util.keystr(p): np.shape(v)
           for p, v in jax.tree_util.tree_leaves_with_path(loaded)}
    if want != got:
      differing = sorted(set(want.items()) ^ set(got.items()))[:3]
      raise checkpoint.CheckpointError(
          f"config.classifier.init_from: {source} does not fit the model's {collection} "
          f"(first differences: {differing}); save the variables of this model.")
  cast = lambda tree, like: jax.tree.map(lambda v, l: jnp.asarray(v, l.dtype), tree, like)
  return state.replace(params=cast(variables["params"], state.params),
                       batch_stats=cast(variables.get("batch_stats", {}), state.batch_stats))
