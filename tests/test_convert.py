"""PyTorch state dicts of three layouts converted: logits equal to the PyTorch twin's."""

import json
import shlex

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch (test-only) is not installed")
nn = torch.nn

from cafd_jax import api, convert, factory  # pylint: disable=g-import-not-at-top
from configs import tiny  # pylint: disable=g-import-not-at-top

from conftest import run_main  # pylint: disable=g-import-not-at-top


# --- PyTorch twins of the three layouts (random weights) ------------------------------------

class CafdVgg(nn.Module):
  """The CAFD reference's CIFAR VGG: conv (bias) + BN + ReLU, 2x2 pools (a trailing one too)."""

  LAYOUTS = {11: [64, "mp", 128, "mp", 256, 256, "mp", 512, 512, "mp", 512, 512, "mp"]}

  def __init__(self, depth=11, num_classes=10):
    super().__init__()
    layers, channels = [], 3
    for item in self.LAYOUTS[depth]:
      if item == "mp":
        layers.append(nn.MaxPool2d(2, 2))
      else:
        layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
        channels = item
    layers.append(nn.AvgPool2d(1, 1))
    self.features = nn.Sequential(*layers)
    self.linear = nn.Linear(512, num_classes)

  def forward(self, x):
    return self.linear(self.features(x).flatten(1))


class TorchvisionBlock(nn.Module):
  def __init__(self, inputs, channels, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(inputs, channels, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(channels)
    self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(channels)
    self.downsample = None
    if stride != 1 or inputs != channels:
      self.downsample = nn.Sequential(nn.Conv2d(inputs, channels, 1, stride, bias=False),
                                      nn.BatchNorm2d(channels))

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchvisionResNet18(nn.Module):
  """torchvision's ResNet-18 names with the CIFAR stem (3x3 conv1, no max pool)."""

  def __init__(self, width=64, num_classes=10):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    channels = width
    for stage in range(4):
      out = width * 2**stage
      blocks = [TorchvisionBlock(channels, out, 1 if stage == 0 else 2), TorchvisionBlock(out, out, 1)]
      setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
      channels = out
    self.fc = nn.Linear(channels, num_classes)

  def forward(self, x):
    x = torch.relu(self.bn1(self.conv1(x)))
    for stage in range(4):
      x = getattr(self, f"layer{stage + 1}")(x)
    return self.fc(x.mean((2, 3)))


class WrnBlock(nn.Module):
  def __init__(self, inputs, channels, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(inputs)
    self.conv1 = nn.Conv2d(inputs, channels, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(channels)
    self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
    self.equal = inputs == channels
    self.convShortcut = None if self.equal else nn.Conv2d(inputs, channels, 1, stride, bias=False)

  def forward(self, x):
    activated = torch.relu(self.bn1(x))
    out = self.conv1(activated)
    out = self.conv2(torch.relu(self.bn2(out)))
    return out + (x if self.equal else self.convShortcut(activated))


class WrnGroup(nn.Module):
  def __init__(self, count, inputs, channels, stride):
    super().__init__()
    self.layer = nn.Sequential(*[WrnBlock(inputs if i == 0 else channels, channels,
                                          stride if i == 0 else 1) for i in range(count)])

  def forward(self, x):
    return self.layer(x)


class RobustBenchWrn(nn.Module):
  """RobustBench's CIFAR Wide-ResNet names (pre-activation blocks, convShortcut)."""

  def __init__(self, depth=28, widen=10, num_classes=10):
    super().__init__()
    count, widths = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.block1 = WrnGroup(count, widths[0], widths[1], 1)
    self.block2 = WrnGroup(count, widths[1], widths[2], 2)
    self.block3 = WrnGroup(count, widths[2], widths[3], 2)
    self.bn1 = nn.BatchNorm2d(widths[3])
    self.fc = nn.Linear(widths[3], num_classes)

  def forward(self, x):
    x = self.block3(self.block2(self.block1(self.conv1(x))))
    return self.fc(torch.relu(self.bn1(x)).mean((2, 3)))


def _randomised(model: nn.Module, seed: int) -> nn.Module:
  """Random weights and BatchNorm statistics (not the defaults), in eval mode."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5, generator=generator)
        module.bias.uniform_(-0.2, 0.2, generator=generator)
        module.running_mean.uniform_(-0.2, 0.2, generator=generator)
        module.running_var.uniform_(0.5, 2.0, generator=generator)
  return model.eval()


TWINS = {
    "cafd_vgg": lambda: CafdVgg(11),
    "torchvision_resnet": lambda: TorchvisionResNet18(),
    "robustbench_wrn": lambda: RobustBenchWrn(28, 10),
}


@pytest.mark.parametrize("layout", convert.LAYOUTS)
def test_converted_logits_equal_the_pytorch_models(layout):
  twin = _randomised(TWINS[layout](), seed=len(layout))
  model_fields, variables, caf = convert.convert(
      {name: value.numpy() for name, value in twin.state_dict().items()}, layout)
  config = tiny.get_config()
  for name, value in convert.overrides_of(model_fields, caf, (0, 0, 0), (1, 1, 1)).items():
    group, field = name.split(".")
    config[group][field] = value
  model = factory.classifier(config, model_fields["num_classes"])
  images = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)
  ours = np.asarray(model.apply(variables, images))
  with torch.no_grad():
    theirs = twin(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  difference = float(np.max(np.abs(ours - theirs)))
  print(f"{layout} -> {model_fields['name']}: max |logit difference| {difference:.2e} "
        f"(logits up to {np.max(np.abs(theirs)):.2f})")
  assert difference < 1e-4


def test_a_state_dict_of_another_layout_is_refused_in_one_line():
  twin = TorchvisionResNet18(width=8)
  with pytest.raises(convert.ConversionError, match="blocks per stage"):
    convert.convert({k: v.numpy() for k, v in twin.state_dict().items()}, "robustbench_wrn")


def test_a_converted_model_is_defended_by_main(tmp_path, capsys):
  twin = _randomised(TorchvisionResNet18(width=16), seed=1)
  path = tmp_path / "resnet18.pt"
  torch.save({"state_dict": {f"module.{k}": v for k, v in twin.state_dict().items()}}, path)
  workdir = tmp_path / "converted"
  assert convert.main(["--layout", "torchvision_resnet", "--state_dict", str(path),
                       "--workdir", str(workdir), "--config", "configs/tiny.py"]) == 0
  command = capsys.readouterr().out.strip().splitlines()[-1]
  images = np.random.default_rng(0).uniform(size=(3, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = twin(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  overrides = shlex.split(command)[7:]  # after: python main.py --config X --workdir D --stages
  assert shlex.split(command)[6] == "--config.stages=craft,train_denoiser,evaluate"
  result = run_main(workdir, "--config.stages=craft,train_denoiser,evaluate", *overrides,
                    "--config.eval.attacks=none,pgd")
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads((workdir / "report.json").read_text())["results"]
  assert {(r["attack"], r["defense"]) for r in rows} == {
      (a, d) for a in ("none", "pgd") for d in ("none", "cafd")}
  np.testing.assert_allclose(api.load(str(workdir)).classify(images), theirs, atol=1e-4)
