"""PyTorch classifiers into this project: a state dict becomes a classifier checkpoint.

    python -m cafd_jax.convert --layout cafd_vgg --state_dict vgg-19.t7 --workdir DIR \\
        [--config configs/cifar10_vgg19.py] [--mean 0,0,0 --std 1,1,1]

Layouts (the architecture is read from the weights' names and shapes):

* ``cafd_vgg``: the CAFD reference repository's CIFAR VGG (``features.N`` conv 3x3 with bias +
  BatchNorm + ReLU, 2x2 max pools including a trailing one, ``linear``), depth 11/13/16/19 ->
  ``vgg{depth}_ref``; CAF by Grad-CAM on the last convolution's output, as the reference hooks it;
* ``torchvision_resnet``: torchvision's ResNet names (``conv1``, ``bn1``, ``layerK.J.convI`` /
  ``bnI`` / ``downsample``, ``fc``) with the CIFAR stem (3x3 ``conv1``, no max pool), depth
  18/34/50 -> ``resnet{depth}``;
* ``robustbench_wrn``: the CIFAR Wide-ResNet of RobustBench (``blockK.layer.J.bn1`` /
  ``conv1`` / ``bn2`` / ``conv2`` / ``convShortcut``, ``bn1``, ``fc``), e.g. WRN-28-10 ->
  ``wrn`` with its depth and widen factor.

Writes DIR/checkpoints/classifier/0 (Orbax), DIR/config.json and DIR/classes.json, which
``api.load`` and ``main.py`` read, and prints the main.py command that crafts, trains the
denoiser and evaluates against it. The inputs of the PyTorch model are taken as pixels in [0, 1]
normalised by ``--mean`` / ``--std`` (default none: the reference feeds ``ToTensor()`` pixels).
torch is needed here only (not in requirements.txt).
"""

import argparse
import importlib.util
import os
import re
import shlex
import sys
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from cafd_jax import checkpoint, config_checks, factory, imported, io_utils, pipeline
from cafd_jax import workdir as workdir_guard

LAYOUTS = ("cafd_vgg", "torchvision_resnet", "robustbench_wrn")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


class ConversionError(ValueError):
  """The state dict does not fit the layout; the message says what was found."""


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a saved PyTorch model (a state dict, a checkpoint dict holding one under
  ``state_dict`` / ``model`` / ``net``, or a pickled module), as numpy, without a
  ``module.`` (DataParallel) prefix."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError("python -m cafd_jax.convert needs PyTorch to read the file: "
                          "pip install torch (CPU is enough)") from None
  try:
    loaded = torch.load(path, map_location="cpu", weights_only=False)
  except Exception as error:  # pylint: disable=broad-except  # torch raises many types
    raise ConversionError(f"cannot read {path} with torch.load ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''})") from None
  for key in ("state_dict", "model", "net"):
    if isinstance(loaded, dict) and key in loaded:
      loaded = loaded[key]
      break
  if isinstance(loaded, torch.nn.Module):
    loaded = loaded.state_dict()
  if not isinstance(loaded, dict):
    raise ConversionError(f"{path} holds a {type(loaded).__name__}, not a state dict")
  return {re.sub(r"^module\.", "", name): value.detach().cpu().numpy()
          for name, value in loaded.items() if hasattr(value, "detach")}


def _conv(weight: np.ndarray) -> dict:
  return {"kernel": np.transpose(weight, (2, 3, 1, 0))}  # [O, I, kh, kw] -> [kh, kw, I, O]


class _Reader:
  """Takes tensors out of a state dict by name, so that leftovers can be reported."""

  def __init__(self, tensors: dict[str, np.ndarray]):
    self.tensors, self.used = tensors, set()

  def has(self, name: str) -> bool:
    return name in self.tensors

  def get(self, name: str) -> np.ndarray:
    if name not in self.tensors:
      raise ConversionError(f"the state dict has no {name!r}")
    self.used.add(name)
    return self.tensors[name]

  def conv(self, prefix: str, bias: bool = False) -> dict:
    values = _conv(self.get(f"{prefix}.weight"))
    if bias:
      values["bias"] = self.get(f"{prefix}.bias")
    return values

  def norm(self, prefix: str) -> tuple[dict, dict]:
    self.used.add(f"{prefix}.num_batches_tracked")
    return ({"scale": self.get(f"{prefix}.weight"), "bias": self.get(f"{prefix}.bias")},
            {"mean": self.get(f"{prefix}.running_mean"), "var": self.get(f"{prefix}.running_var")})

  def dense(self, prefix: str) -> dict:
    return {"kernel": self.get(f"{prefix}.weight").T, "bias": self.get(f"{prefix}.bias")}

  def check_all_used(self) -> None:
    left = sorted(set(self.tensors) - self.used)
    if left:
      raise ConversionError(f"{len(left)} tensors of the state dict have no place in this "
                            f"layout (first: {', '.join(left[:3])}); is it another layout?")


def _count(tensors: dict, pattern: str) -> int:
  return len({match[1] for name in tensors if (match := re.match(pattern, name))})


def _cafd_vgg(reader: _Reader) -> tuple[dict, dict, dict]:
  indices = sorted({int(m[1]) for name in reader.tensors
                    if (m := re.match(r"features\.(\d+)\.weight$", name))
                    and reader.tensors[name].ndim == 4})
  depth = len(indices) + 3  # + the three dense layers of the original VGG count
  if depth not in (11, 13, 16, 19):
    raise ConversionError(f"found {len(indices)} convolutions under features.N, which is no "
                          f"VGG-11/13/16/19")
  params, stats = {}, {}
  for number, index in enumerate(indices):
    params[f"Conv3x3_{number}"] = reader.conv(f"features.{index}", bias=True)
    params[f"BatchNorm_{number}"], stats[f"BatchNorm_{number}"] = reader.norm(
        f"features.{index + 1}")
  params["head"] = {"dense": reader.dense("linear")}
  model = {"name": f"vgg{depth}_ref", "width": 1.0}
  caf = {"weights": "gradcam", "feature_layer": f"Conv3x3_{len(indices) - 1}"}
  return model, params, {"batch_stats": stats, "caf": caf}


def _torchvision_resnet(reader: _Reader) -> tuple[dict, dict, dict]:
  stem = reader.tensors.get("conv1.weight")
  if stem is None or stem.shape[2:] != (3, 3):
    raise ConversionError("conv1 must be the CIFAR stem (3x3); an ImageNet stem (7x7 + max "
                          "pool) has no counterpart here")
  bottleneck = any(name.endswith(".conv3.weight") for name in reader.tensors)
  blocks = [_count(reader.tensors, rf"layer{stage}\.(\d+)\.") for stage in (1, 2, 3, 4)]
  depths = {(False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34, (True, (3, 4, 6, 3)): 50}
  depth = depths.get((bottleneck, tuple(blocks)))
  if depth is None:
    raise ConversionError(f"blocks per stage {blocks} ({'bottleneck' if bottleneck else 'basic'})"
                          f" are none of ResNet-18/34/50")
  params = {"Conv_0": reader.conv("conv1")}
  stats = {}
  params["BatchNorm_0"], stats["BatchNorm_0"] = reader.norm("bn1")
  block_name, convs = ("Bottleneck", 3) if bottleneck else ("BasicBlock", 2)
  number = 0
  for stage, count in enumerate(blocks, start=1):
    for index in range(count):
      prefix, block, block_stats = f"layer{stage}.{index}", {}, {}
      for i in range(convs):
        block[f"Conv_{i}"] = reader.conv(f"{prefix}.conv{i + 1}")
        block[f"BatchNorm_{i}"], block_stats[f"BatchNorm_{i}"] = reader.norm(f"{prefix}.bn{i + 1}")
      if reader.has(f"{prefix}.downsample.0.weight"):
        block[f"Conv_{convs}"] = reader.conv(f"{prefix}.downsample.0")
        block[f"BatchNorm_{convs}"], block_stats[f"BatchNorm_{convs}"] = reader.norm(
            f"{prefix}.downsample.1")
      params[f"{block_name}_{number}"], stats[f"{block_name}_{number}"] = block, block_stats
      number += 1
  params["head"] = {"dense": reader.dense("fc")}
  width = stem.shape[0] / 64
  return {"name": f"resnet{depth}", "width": width}, params, {"batch_stats": stats}


def _robustbench_wrn(reader: _Reader) -> tuple[dict, dict, dict]:
  blocks = [_count(reader.tensors, rf"block{stage}\.layer\.(\d+)\.") for stage in (1, 2, 3)]
  if not blocks[0] or len(set(blocks)) != 1:
    raise ConversionError(f"blocks per stage {blocks}: not a WRN (blockK.layer.J, K = 1..3)")
  depth = 6 * blocks[0] + 4
  widen = reader.tensors["block1.layer.0.conv1.weight"].shape[0] // 16
  params, stats = {"Conv_0": reader.conv("conv1")}, {}
  number = 0
  for stage in (1, 2, 3):
    for index in range(blocks[0]):
      prefix, block, block_stats = f"block{stage}.layer.{index}", {}, {}
      block["BatchNorm_0"], block_stats["BatchNorm_0"] = reader.norm(f"{prefix}.bn1")
      block["Conv_0"] = reader.conv(f"{prefix}.conv1")
      block["BatchNorm_1"], block_stats["BatchNorm_1"] = reader.norm(f"{prefix}.bn2")
      block["Conv_1"] = reader.conv(f"{prefix}.conv2")
      if reader.has(f"{prefix}.convShortcut.weight"):
        block["Conv_2"] = reader.conv(f"{prefix}.convShortcut")
      params[f"WideBlock_{number}"], stats[f"WideBlock_{number}"] = block, block_stats
      number += 1
  params["BatchNorm_0"], stats["BatchNorm_0"] = reader.norm("bn1")
  params["head"] = {"dense": reader.dense("fc")}
  return ({"name": "wrn", "depth": depth, "widen_factor": widen, "width": 1.0}, params,
          {"batch_stats": stats})


_CONVERTERS: dict[str, Callable[[_Reader], tuple[dict, dict, dict]]] = {
    "cafd_vgg": _cafd_vgg, "torchvision_resnet": _torchvision_resnet,
    "robustbench_wrn": _robustbench_wrn}


def convert(tensors: dict[str, np.ndarray], layout: str) -> tuple[dict, dict, dict]:
  """(model config fields, variables, CAF config fields) of a state dict in ``layout``."""
  if layout not in _CONVERTERS:
    raise ConversionError(f"--layout must be one of {','.join(LAYOUTS)}, got {layout!r}")
  reader = _Reader(tensors)
  model, params, extra = _CONVERTERS[layout](reader)
  reader.check_all_used()
  model["num_classes"] = int(params["head"]["dense"]["bias"].shape[0])
  variables = {"params": params, "batch_stats": extra["batch_stats"]}
  return model, variables, extra.get("caf", {})


def _load_config(path: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("converted_config", path)
  if spec is None or not os.path.exists(path):
    raise config_checks.ConfigError(f"--config {path} not found.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def overrides_of(model: dict, caf: dict, mean: tuple, std: tuple) -> dict[str, Any]:
  """The config fields a converted model sets (``--config.FIELD=VALUE`` of its main.py runs)."""
  fields = {f"model.{name}": value for name, value in model.items() if name != "num_classes"}
  fields.update({"model.mean": tuple(mean), "model.std": tuple(std),
                 "model.head": "gap_dense"})
  fields.update({f"caf.{name}": value for name, value in caf.items()})
  return fields


def write_workdir(workdir: str, config: ml_collections.ConfigDict, variables: dict,
                  class_names: tuple[str, ...]) -> None:
  """config.json, classes.json and classifier checkpoint 0 holding ``variables``."""
  workdir_guard.check_config(workdir, config.to_dict())
  lock = workdir_guard.Lock(workdir)
  lock.acquire()
  try:
    directory = os.path.join(workdir, pipeline.CLASSIFIER_DIR)
    if checkpoint.latest_step(directory) is not None:
      raise workdir_guard.WorkdirError(f"{directory} already holds a classifier; convert into "
                                       f"another --workdir.")
    state = factory.classifier_state(config, len(class_names), jax.random.key(0), 1)
    state = imported.with_variables(state, variables, "the converted state dict")
    checkpoints = checkpoint.manager(directory)
    try:
      checkpoint.save(checkpoints, 0, state)
    finally:
      checkpoints.close()
    io_utils.write_json(os.path.join(workdir, workdir_guard.CONFIG_FILE), config.to_dict())
    io_utils.write_json(os.path.join(workdir, pipeline.CLASSES_FILE), list(class_names))
  finally:
    lock.release()


def _floats(text: str) -> tuple[float, ...]:
  values = tuple(float(value) for value in text.split(","))
  if len(values) != 3:
    raise argparse.ArgumentTypeError("three comma-separated numbers, one per channel")
  return values


def _flag(name: str, value: Any) -> str:
  """``--config.NAME=VALUE``, quoted for a POSIX shell."""
  text = f"({','.join(repr(item) for item in value)})" if isinstance(value, tuple) else value
  return shlex.quote(f"--config.{name}={text}")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layout", required=True, choices=LAYOUTS)
  parser.add_argument("--state_dict", required=True, help="a file torch.load reads")
  parser.add_argument("--workdir", required=True, help="a new workdir for main.py")
  parser.add_argument("--config", default="configs/cifar10_vgg19.py",
                      help="the config the main.py runs will use")
  parser.add_argument("--mean", type=_floats, default=(0.0, 0.0, 0.0))
  parser.add_argument("--std", type=_floats, default=(1.0, 1.0, 1.0))
  parser.add_argument("--class_names", default=",".join(CIFAR10_CLASSES))
  args = parser.parse_args(argv)
  try:
    model, variables, caf = convert(read_state_dict(args.state_dict), args.layout)
    class_names = tuple(args.class_names.split(","))
    if len(class_names) != model["num_classes"]:
      raise ConversionError(f"the model has {model['num_classes']} classes, --class_names "
                            f"names {len(class_names)}")
    config = _load_config(args.config)
    fields = overrides_of(model, caf, args.mean, args.std)
    for name, value in fields.items():
      group, field = name.split(".")
      config[group][field] = value
    config_checks.validate(config)
    write_workdir(args.workdir, config, variables, class_names)
  except (ConversionError, config_checks.ConfigError, checkpoint.CheckpointError,
          workdir_guard.WorkdirError, OSError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  flags = " ".join(_flag(name, value) for name, value in fields.items())
  print(f"[convert] {args.layout} -> {model['name']} ({model['num_classes']} classes) in "
        f"{args.workdir}; defend it with:\n  python main.py --config {args.config} "
        f"--workdir {args.workdir} --config.stages=craft,train_denoiser,evaluate {flags}",
        flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
