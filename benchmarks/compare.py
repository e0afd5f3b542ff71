"""Images per second of the three hot steps, this project (JAX) against PyTorch, same shapes.

    python -m benchmarks.compare [--models vgg19,resnet18] [--batch_size 128] [--dtype float32]

(a) classifier train step (SGD, BatchNorm in training mode, no augmentation);
(b) one CAF-attack step: forward + input gradient of the CAF distance, then a signed step;
(c) CAFD denoiser train step: U-Net + frozen classifier CAF + relativistic GAN discriminator,
    then the discriminator's own step (both Adam).
Each is timed after warm-up in rounds that alternate one call of this project's step with one of
PyTorch's (in a child process of its own with all CPU threads, or CUDA when JAX runs on a GPU);
a row gives each side's median img/s and the median and range of the per-round ratios. Needs
torch (``pip install torch==2.13.0`` on CPU); the cafd_jax package itself never imports it.
"""

import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import statistics
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks import hardware
from cafd_jax import cam, factory
from cafd_jax.train import classifier as classifier_train
from cafd_jax.train import denoiser as denoiser_train
from configs import base

BENCHMARKS = ("classifier_step", "caf_attack_step", "denoiser_step")
# Pause before each timed call of the paired rounds, so that the other framework's worker
# threads, which spin for a while after its call before they sleep, are idle.
SETTLE_SECONDS = 0.2


class Step(NamedTuple):
  """One benchmark of this project: ``run()`` does one compiled step (its output is waited on);
  ``flops()`` is XLA's FLOP count of that step as compiled."""
  run: Callable[[], object]
  flops: Callable[[], float | None]


def timed_call(run: Callable[[], object], wait: Callable[[object], object]) -> float:
  start = time.perf_counter()
  wait(run())
  return time.perf_counter() - start


def warm_up(run: Callable[[], object], calls: int, wait: Callable[[object], object]) -> None:
  for _ in range(calls):
    wait(run())


def median_seconds(run: Callable[[], object], warmup: int, repeats: int,
                   wait: Callable[[object], object]) -> float:
  warm_up(run, warmup, wait)
  return statistics.median(timed_call(run, wait) for _ in range(repeats))


def _config(model: str, dtype: str) -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model.name = model
  config.compute_dtype = dtype
  return config


def jax_steps(model: str, batch_size: int, dtype: str) -> dict[str, Step]:
  """Each benchmark as a ``Step`` of this project on fixed data."""
  config = _config(model, dtype)
  compute = factory.training_dtype(config)
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.uniform(keys[0], (batch_size, 32, 32, 3))
  x_adv = jnp.clip(x + 8 / 255 * jax.random.rademacher(keys[1], x.shape, jnp.float32), 0, 1)
  y = jax.random.randint(keys[2], (batch_size,), 0, 10)
  state = factory.classifier_state(config, 10, keys[3], 390, compute)
  holder = {"state": state}

  def classifier_step():
    holder["state"], metrics = classifier_train.train_step(holder["state"], x, y, keys[0], False)
    return metrics["loss"]

  network = factory.classifier(config, 10, compute)
  frozen = factory.classifier_state(config, 10, keys[2], 390, compute)  # not donated
  variables = {"params": frozen.params, "batch_stats": frozen.batch_stats}

  def caf_fn(variables):  # at feature resolution, as attacks.caf_attack uses it
    return denoiser_train.classifier_caf_fn(network, variables, "weighted_features", "label",
                                            upsample=False)

  natural = jax.jit(lambda variables: caf_fn(variables)(x, y))(variables)

  @jax.jit
  def caf_step(variables, x_adv, natural):
    objective = lambda z: jnp.sum(cam.caf_distance(caf_fn(variables)(z, y), natural,
                                                   x.shape[1:3]))
    grad = jax.grad(objective)(x_adv)
    return jnp.clip(x_adv + 0.01 * jnp.sign(grad), 0, 1)

  states = factory.denoiser_states(config, keys[1], 390, compute)
  denoiser_holder = {"states": states}
  step = denoiser_train.make_train_step(network, caf_kind="weighted_features",
                                        class_source="label", caf_weight=1e3, gan_weight=5e-3)

  def denoiser_step():
    denoiser_holder["states"], metrics = step(denoiser_holder["states"], variables, x_adv, x, y)
    return metrics["loss"]

  return {
      "classifier_step": Step(classifier_step, lambda: hardware.compiled_flops(
          classifier_train.train_step, holder["state"], x, y, keys[0], False)),
      "caf_attack_step": Step(lambda: caf_step(variables, x_adv, natural),
                              lambda: hardware.compiled_flops(caf_step, variables, x_adv, natural)),
      "denoiser_step": Step(denoiser_step, lambda: hardware.compiled_flops(
          step, denoiser_holder["states"], variables, x_adv, x, y)),
  }


def torch_steps(model: str, batch_size: int, device: str,
                dtype: str = "float32") -> dict[str, Callable[[], object]]:
  """The same three steps in PyTorch (eager, as the original CAFD code runs): float32, or
  bfloat16 compute with float32 parameters by ``torch.autocast``; on CUDA with cuDNN's
  algorithm search on (``cudnn.benchmark``), as a PyTorch user would time it."""
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_reference as reference  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  torch.backends.cudnn.benchmark = device == "cuda"
  precision = (functools.partial(torch.autocast, device, dtype=torch.bfloat16)
               if dtype == "bfloat16" else contextlib.nullcontext)
  x = torch.rand(batch_size, 3, 32, 32, device=device)
  x_adv = torch.clamp(x + 8 / 255 * torch.sign(torch.randn_like(x)), 0, 1)
  y = torch.randint(0, 10, (batch_size,), device=device)
  network = reference.classifier(model).to(device)
  optimizer = torch.optim.SGD(network.parameters(), 0.1, momentum=0.9, weight_decay=5e-4)
  train = reference.classifier_step(network.train(), optimizer, precision)
  frozen = reference.classifier(model).to(device).eval()
  with torch.no_grad():
    natural = reference.weighted_features(frozen, x, y)
  attack = reference.caf_attack_step(frozen, precision)
  denoise = reference.denoiser_step(frozen, reference.UNetDenoiser().to(device).train(),
                                    reference.Discriminator().to(device), precision=precision)
  return {"classifier_step": lambda: train(x, y),
          "caf_attack_step": lambda: attack(x_adv, natural, y),
          "denoiser_step": lambda: denoise(x_adv, x, y)}


def _torch_worker(connection, model: str, batch_size: int, dtype: str, device: str,
                  warmup: int, benchmarks: tuple[str, ...]) -> None:
  """Child process: builds and warms up PyTorch's steps, says ``"ready"``, then times one call
  of each step name it receives (seconds back) until it receives ``None``."""
  import torch  # pylint: disable=g-import-not-at-top
  if device == "cpu":
    torch.set_num_threads(os.cpu_count() or 1)
  steps = torch_steps(model, batch_size, device, dtype)
  sync = (lambda value: torch.cuda.synchronize()) if device == "cuda" else (lambda value: value)
  for name in benchmarks:
    warm_up(steps[name], warmup, sync)
  connection.send("ready")
  while (name := connection.recv()) is not None:
    time.sleep(SETTLE_SECONDS)
    connection.send(timed_call(steps[name], sync))


def paired_seconds(ours: Callable[[str], float], theirs: Callable[[str], float],
                   benchmarks: tuple[str, ...], repeats: int) -> dict[str, list[tuple]]:
  """``repeats`` rounds; in each, one timed call per benchmark of ours and of theirs back to
  back, ours first in even rounds and theirs first in odd ones, so that the machine's drift
  (other load, clocks, caches) falls on both alike. Returns (ours, theirs) seconds per round."""
  pairs = {name: [] for name in benchmarks}
  for round_index in range(repeats):
    for name in benchmarks:
      if round_index % 2 == 0:
        ours_seconds = ours(name)
        theirs_seconds = theirs(name)
      else:
        theirs_seconds = theirs(name)
        ours_seconds = ours(name)
      pairs[name].append((ours_seconds, theirs_seconds))
  return pairs


def measure(model_names: list[str], batch_size: int, dtype: str, warmup: int, repeats: int,
            with_torch: bool = True, benchmarks: tuple[str, ...] = BENCHMARKS) -> list[dict]:
  """One row per (model, benchmark): img/s of JAX and PyTorch (medians) and the median of the
  per-round ratios; the JAX step's FLOPs, achieved TFLOP/s and, on a device of
  ``hardware.PEAK_TFLOPS``, its MFU.

  PyTorch's steps live in a child process per model (spawned, no JAX in it), which times one
  call when asked and otherwise waits; the two frameworks' calls alternate round by round
  (``paired_seconds``), so a slow spell of the machine slows both sides of a round, and each
  ratio compares calls made seconds apart.
  """
  rows = []
  torch_device = "cuda" if jax.default_backend() == "gpu" else "cpu"
  for model in model_names:
    ours = jax_steps(model, batch_size, dtype)
    for name in benchmarks:
      warm_up(ours[name].run, warmup, jax.block_until_ready)

    def time_ours(name):
      time.sleep(SETTLE_SECONDS)
      return timed_call(ours[name].run, jax.block_until_ready)

    if with_torch:
      context = multiprocessing.get_context("spawn")
      connection, child_end = context.Pipe()
      worker = context.Process(target=_torch_worker, args=(
          child_end, model, batch_size, dtype, torch_device, warmup, benchmarks), daemon=True)
      worker.start()
      try:
        if connection.recv() != "ready":
          raise RuntimeError("the PyTorch child process did not start")

        def time_theirs(name):
          connection.send(name)
          return connection.recv()

        pairs = paired_seconds(time_ours, time_theirs, benchmarks, repeats)
        connection.send(None)
      finally:
        worker.join(timeout=60)
        if worker.is_alive():
          worker.terminate()
    else:
      pairs = {name: [(time_ours(name), None) for _ in range(repeats)] for name in benchmarks}
    for name in benchmarks:
      row = {"model": model, "benchmark": name, "batch_size": batch_size, "dtype": dtype,
             "device": str(jax.devices()[0].device_kind)}
      seconds = statistics.median(ours_s for ours_s, _ in pairs[name])
      row["jax_img_s"] = batch_size / seconds
      row["jax_flops"] = ours[name].flops()
      row["jax_tflop_s"], row["jax_mfu"] = hardware.utilisation(row["jax_flops"], seconds, dtype)
      if with_torch:
        row["torch_img_s"] = batch_size / statistics.median(t for _, t in pairs[name])
        ratios = [theirs_s / ours_s for ours_s, theirs_s in pairs[name]]
        row["ratio"] = statistics.median(ratios)
        row["ratio_range"] = (min(ratios), max(ratios))
      rows.append(row)
      print(format_row(row), flush=True)
  return rows


def format_row(row: dict) -> str:
  text = f"{row['model']:>9} {row['benchmark']:>16}  jax {row['jax_img_s']:8.1f} img/s"
  if row.get("jax_tflop_s") is not None:
    text += f" {row['jax_tflop_s']:7.3f} TFLOP/s"
  if row.get("jax_mfu") is not None:
    text += f" MFU {100 * row['jax_mfu']:4.1f}%"
  if "torch_img_s" in row:
    low, high = row["ratio_range"]
    text += (f"  torch {row['torch_img_s']:8.1f} img/s  jax/torch {row['ratio']:.2f}"
             f" ({low:.2f}-{high:.2f})")
  return text


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="vgg19,resnet18")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5, help="timed rounds per step")
  parser.add_argument("--no_torch", action="store_true", help="time this project only")
  parser.add_argument("--benchmarks", default=",".join(BENCHMARKS), help="a subset to time")
  parser.add_argument("--out", default="", help="also write the rows to this JSON file")
  args = parser.parse_args()
  benchmarks = tuple(args.benchmarks.split(","))
  if not set(benchmarks) <= set(BENCHMARKS):
    parser.error(f"--benchmarks: choose from {','.join(BENCHMARKS)}")
  print(hardware.host_line(), flush=True)
  print(f"devices {jax.devices()}  batch {args.batch_size}  dtype {args.dtype}  "
        f"XLA_FLAGS {os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  rows = measure(args.models.split(","), args.batch_size, args.dtype, args.warmup, args.repeats,
                 not args.no_torch, benchmarks)
  if args.out:
    with open(args.out, "w") as file:
      json.dump(rows, file, indent=2)


if __name__ == "__main__":
  main()
