"""The benchmarked networks and steps in PyTorch (NCHW), equivalent to the Flax ones.

Benchmark-only: the cafd_jax package never imports torch. Architectures mirror
cafd_jax/models: VGG-BN and CIFAR ResNet (GAP + dense head), the HGD U-Net denoiser and the
VGG-style discriminator; the steps mirror cafd_jax/train (classifier SGD step, CAF-attack
input gradient, CAFD denoiser + discriminator Adam steps). Each step takes ``precision``, a
context manager factory around its forward passes: ``contextlib.nullcontext`` for float32,
``torch.autocast`` for bfloat16 compute with float32 parameters (PyTorch's mixed precision).
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

VGG_LAYOUTS = {
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512,
              "M", 512, 512, 512, 512),
}


def _conv_bn_relu(in_channels, out_channels, stride=1, bias=True):
  return [nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=bias),
          nn.BatchNorm2d(out_channels, momentum=0.1), nn.ReLU(inplace=True)]


class VGG(nn.Module):
  def __init__(self, layout, num_classes=10):
    super().__init__()
    layers, channels = [], 3
    for item in layout:
      if item == "M":
        layers.append(nn.MaxPool2d(2))
      else:
        layers += _conv_bn_relu(channels, item)
        channels = item
    self.features = nn.Sequential(*layers)
    self.head = nn.Linear(channels, num_classes)

  def forward(self, x, return_features=False):
    features = self.features(x)
    logits = self.head(features.mean(dim=(2, 3)))
    return (logits, features) if return_features else logits


class BasicBlock(nn.Module):
  def __init__(self, in_channels, channels, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(channels)
    self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(channels)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_channels != channels:
      self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                    nn.BatchNorm2d(channels))

  def forward(self, x):
    h = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet18(nn.Module):
  def __init__(self, num_classes=10):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                              nn.ReLU(inplace=True))
    blocks, channels = [], 64
    for stage in range(4):
      for index in range(2):
        out = 64 * 2**stage
        blocks.append(BasicBlock(channels, out, 2 if stage and not index else 1))
        channels = out
    self.blocks = nn.Sequential(*blocks)
    self.head = nn.Linear(channels, num_classes)

  def forward(self, x, return_features=False):
    features = self.blocks(self.stem(x))
    logits = self.head(features.mean(dim=(2, 3)))
    return (logits, features) if return_features else logits


class UNetDenoiser(nn.Module):
  """HGD U-Net as cafd_jax.models.UNetDenoiser: predicts the noise, returns clip(x + noise)."""

  def __init__(self, encoder=(64, 128, 256, 256, 256), encoder_convs=(2, 3, 3, 3, 3),
               decoder=(256, 256, 128, 64), decoder_convs=(3, 3, 3, 2)):
    super().__init__()
    self.encoder, channels = nn.ModuleList(), 3
    for stage, (out, convs) in enumerate(zip(encoder, encoder_convs)):
      layers = []
      for index in range(convs):
        layers += _conv_bn_relu(channels, out, 2 if stage and not index else 1)
        channels = out
      self.encoder.append(nn.Sequential(*layers))
    self.decoder = nn.ModuleList()
    for out, convs, skip in zip(decoder, decoder_convs, encoder[-2::-1]):
      layers, channels = [], channels + skip
      for _ in range(convs):
        layers += _conv_bn_relu(channels, out)
        channels = out
      self.decoder.append(nn.Sequential(*layers))
    self.noise = nn.Conv2d(channels, 3, 1)

  def forward(self, x):
    h, skips = x, []
    for stage in self.encoder:
      h = stage(h)
      skips.append(h)
    for stage, skip in zip(self.decoder, skips[-2::-1]):
      h = F.interpolate(h, size=skip.shape[2:], mode="bilinear", align_corners=False)
      h = stage(torch.cat([h, skip], dim=1))
    return torch.clamp(x + self.noise(h), 0, 1)


class Discriminator(nn.Module):
  def __init__(self, base_channels=32, num_stages=4):
    super().__init__()
    layers, channels = [], 3
    for stage in range(num_stages):
      out = base_channels * 2**stage
      layers += [nn.Conv2d(channels, out, 3, 1, 1), nn.LeakyReLU(0.2),
                 nn.Conv2d(out, out, 3, 2, 1), nn.LeakyReLU(0.2)]
      channels = out
    self.features = nn.Sequential(*layers)
    self.head = nn.Sequential(nn.Linear(channels, 100), nn.LeakyReLU(0.2), nn.Linear(100, 1))

  def forward(self, x):
    return self.head(self.features(2 * x - 1).mean(dim=(2, 3)))[:, 0]


def classifier(name):
  return VGG(VGG_LAYOUTS[name]) if name in VGG_LAYOUTS else ResNet18()


def weighted_features(model, x, labels):
  """CAF: last conv features weighted channel-wise by the head row of each label."""
  _, features = model(x, return_features=True)
  return features * model.head.weight[labels][:, :, None, None]


def classifier_step(model, optimizer, precision=contextlib.nullcontext):
  def step(x, y):
    optimizer.zero_grad(set_to_none=True)
    with precision():
      loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss
  return step


def caf_attack_step(model, precision=contextlib.nullcontext):
  """One CAF-PGD iteration: the input gradient of the CAF distance to the natural CAF, then a
  signed step."""
  def step(x_adv, natural, y):
    x_adv = x_adv.detach().requires_grad_(True)
    with precision():
      caf = weighted_features(model, x_adv, y).float()
    loss = ((caf - natural) ** 2).mean(dim=(1, 2, 3)).sum()
    (grad,) = torch.autograd.grad(loss, x_adv)
    return torch.clamp(x_adv.detach() + 0.01 * grad.sign(), 0, 1)
  return step


def relativistic_loss(real, fake):
  """RaGAN loss of the discriminator; swap the arguments for the generator's."""
  ones, zeros = torch.ones_like(real), torch.zeros_like(fake)
  return (F.binary_cross_entropy_with_logits(real - fake.mean(), ones)
          + F.binary_cross_entropy_with_logits(fake - real.mean(), zeros)) / 2


def denoiser_step(model, denoiser, discriminator, caf_weight=1e3, gan_weight=5e-3,
                  precision=contextlib.nullcontext):
  """CAFD step: denoiser on CAF distance + relativistic GAN term, then the discriminator."""
  denoiser_opt = torch.optim.Adam(denoiser.parameters(), 1e-3, weight_decay=2e-4)
  disc_opt = torch.optim.Adam(discriminator.parameters(), 1e-3, weight_decay=2e-4)
  for parameter in model.parameters():
    parameter.requires_grad_(False)

  def step(x_adv, x, y):
    with torch.no_grad(), precision():
      natural = weighted_features(model, x, y).float()
      real = discriminator(x).float()
    denoiser_opt.zero_grad(set_to_none=True)
    with precision():
      denoised = denoiser(x_adv)
      caf = weighted_features(model, denoised, y).float()
      fake = discriminator(denoised).float()
    caf_loss = ((caf - natural) ** 2).mean()
    gan_loss = relativistic_loss(fake, real)
    (caf_weight * caf_loss + gan_weight * gan_loss).backward()
    denoiser_opt.step()
    disc_opt.zero_grad(set_to_none=True)
    denoised = denoised.detach()
    with precision():
      real, fake = discriminator(x).float(), discriminator(denoised).float()
    relativistic_loss(real, fake).backward()
    disc_opt.step()
    return caf_loss
  return step
