"""Wall time of a config's whole pipeline, stage by stage, extrapolated from measured steps.

    python -m benchmarks.stages --config configs/cifar10_vgg19.py [--config.compute_dtype=bfloat16]

Each stage's compiled step is built as the pipeline builds it (same config, mesh, shardings,
compute dtype, batch sizes), run on random data after one warm-up call (its time, compilation
included, is printed as "compile"), timed as the median of ``--repeats`` calls, and multiplied
by the number of such calls the config makes:

* train_classifier, train_denoiser, train_baselines: epochs x (examples // batch) steps;
* craft and evaluate: ceil(examples / batch) attack calls per attack. An iterative attack of
  more than 4 iterations is timed at 2 and 4: half the difference is the time per iteration,
  extrapolated linearly to the configured count (a single iteration is not used: XLA compiles
  a one-trip loop as straight-line code, which can run at another speed than the loop body).
  Evaluation adds one prediction per defense per attacked batch.

Runs as one process over its local devices (as the pipeline's one-host runs). Not included:
compilation, data loading, checkpoint writes, and evaluation beyond the ``unseen`` threat
model (adaptive attacks, eps sweeps and transfer targets are listed as skipped). Set sizes
come from the config, or from --num_train / --num_test where it says 0 (the whole split;
defaults: CIFAR-10's 50,000 and 10,000).
"""

import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from benchmarks import compare, hardware
from cafd_jax import config_checks, evaluate, factory, parallel, pipeline
from cafd_jax.train import common
from cafd_jax.train import denoiser as denoiser_train
from cafd_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_NUM_TRAIN = flags.DEFINE_integer("num_train", 50_000, "Training-split size where the config "
                                  "says 0 (the whole split).")
_NUM_TEST = flags.DEFINE_integer("num_test", 10_000, "Test-split size where the config says 0.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10, "Classes of the data set.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per step (median).")
_OUT = flags.DEFINE_string("out", "", "Also write the rows to this JSON file.")
flags.mark_flags_as_required(["config"])

# The parameters that set an attack's iteration count (scaled together); attacks with none of
# them are timed whole.
ITERATION_PARAMS = {"square": ("n_queries",), "autoattack": ("steps", "square_queries")}


@dataclasses.dataclass
class StageTime:
  """One timed step of a stage and its extrapolation to the whole stage."""
  stage: str
  part: str
  calls: int  # how many times the stage runs this step
  call_seconds: float  # one call as configured (extrapolated for iterative attacks)
  compile_seconds: float
  flops: float | None = None  # one call, where XLA counts it (loop-free steps)

  @property
  def total_seconds(self) -> float:
    return self.calls * self.call_seconds


def _median_seconds(run: Callable[[], object], repeats: int) -> tuple[float, float]:
  """(median seconds of ``repeats`` calls, seconds of the first, compiling, call)."""
  start = time.perf_counter()
  jax.block_until_ready(run())
  compile_seconds = time.perf_counter() - start
  return compare.median_seconds(run, 0, repeats, jax.block_until_ready), compile_seconds


def iteration_params(name: str, params: dict) -> tuple[str, ...]:
  names = ITERATION_PARAMS.get(name, ("steps",))
  return tuple(key for key in names if key in params)


def scaled_params(params: dict, keys: tuple[str, ...], iterations: int) -> dict:
  """``params`` with ``keys[0]`` set to ``iterations`` and the other keys scaled alike."""
  full = params[keys[0]]
  return dict(params, **{key: max(1, round(params[key] * iterations / full)) for key in keys})


SHORT, LONG = 2, 4  # the iteration counts an iterative attack is timed at


def linear_extrapolation(short: float, long: float, iterations: int) -> float:
  """Seconds of ``iterations`` iterations from calls of SHORT (``short`` s) and LONG (``long`` s)
  iterations (never below the SHORT call)."""
  per_iteration = max(long - short, 0.0) / (LONG - SHORT)
  return short + (iterations - SHORT) * per_iteration


def _time_attack(stage: str, part: str, make_call: Callable[[dict], Callable[[], object]],
                 name: str, params: dict, calls: int, repeats: int) -> StageTime:
  """An attack call with ``params``, extrapolated over its iterations (see module docstring)."""
  keys = iteration_params(name, params)
  if not keys or params[keys[0]] <= LONG:
    seconds, compile_seconds = _median_seconds(make_call(params), repeats)
    return StageTime(stage, part, calls, seconds, compile_seconds)
  short, compile_seconds = _median_seconds(make_call(scaled_params(params, keys, SHORT)), repeats)
  long, _ = _median_seconds(make_call(scaled_params(params, keys, LONG)), repeats)
  iterations = params[keys[0]]
  return StageTime(stage, f"{part} ({iterations} it. from {SHORT} and {LONG})", calls,
                   linear_extrapolation(short, long, iterations), compile_seconds)


def _train_step_time(stage: str, part: str, step_fn, state, batch: tuple, frozen, steps: int,
                     mesh, config, repeats: int) -> StageTime:
  compiled, shardings = loop.compile_step(step_fn, state, mesh, config.parallel.fsdp)
  holder = {"state": parallel.place_state(state, shardings)}
  batch = tuple(jax.device_put(array, parallel.batch_sharding(mesh)) for array in batch)
  frozen = parallel.replicate(frozen, mesh)
  key = parallel.replicate(jax.random.key(0), mesh)

  def run():
    holder["state"], metrics = compiled(holder["state"], batch, key, frozen)
    return metrics

  seconds, compile_seconds = _median_seconds(run, repeats)
  flops = hardware.compiled_flops(compiled, holder["state"], batch, key, frozen)
  return StageTime(stage, part, steps, seconds, compile_seconds, flops)


def _random_batch(size: int, image_size: int, num_classes: int, seed: int) -> tuple:
  keys = jax.random.split(jax.random.key(seed), 2)
  images = np.asarray(jax.random.uniform(keys[0], (size, image_size, image_size, 3)))
  labels = np.asarray(jax.random.randint(keys[1], (size,), 0, num_classes))
  return images, labels


def set_sizes(config: ml_collections.ConfigDict, num_train: int, num_test: int
              ) -> dict[str, int]:
  """Examples each stage sees: classifier training, crafting / denoiser training, evaluation."""
  train = min(config.data.num_train or num_train, num_train)
  test = min(config.data.num_test or num_test, num_test)
  return {"train": train, "craft": min(config.craft.num_examples or train, train),
          "eval": min(config.eval.num_examples or test, test)}


def measure(config: ml_collections.ConfigDict, num_train: int, num_test: int, num_classes: int,
            repeats: int, log: Callable[[str], None] = print) -> list[StageTime]:
  """Every stage of ``config.stages`` that computes (the report stage does not), timed."""
  stages = config_checks.split_names(config.stages)
  sizes = set_sizes(config, num_train, num_test)
  mesh, local = parallel.make_mesh(), parallel.local_mesh()
  dtype = factory.training_dtype(config)
  size = config.data.image_size
  classifier = factory.classifier(config, num_classes)
  variables = common.variables_of(factory.classifier_state(config, num_classes,
                                                           jax.random.key(1), 1))
  rows = []

  def add(row: StageTime) -> None:
    rows.append(row)
    log(format_row(row, config.compute_dtype, mesh.size))

  if "train_classifier" in stages:
    train = config.classifier
    steps_per_epoch = sizes["train"] // train.batch_size
    state = factory.classifier_state(config, num_classes, jax.random.key(0), steps_per_epoch,
                                     dtype)
    add(_train_step_time("train_classifier", "classifier step",
                         pipeline.classifier_step_fn(config, steps_per_epoch),
                         state, _random_batch(train.batch_size, size, num_classes, 0), None,
                         train.num_epochs * steps_per_epoch, mesh, config, repeats))
  bound = parallel.replicate(variables, local)
  if "craft" in stages:
    images, labels = (jax.device_put(a, parallel.batch_sharding(local)) for a in
                      _random_batch(config.craft.batch_size, size, num_classes, 1))
    params = {name: config.craft[name] for name in ("eps", "step_size", "steps", "random_start")}

    def craft_call(params):
      attack = evaluate.caf_attack(config, classifier, params, local)
      return lambda: attack(bound, images, labels, jax.random.key(2))

    add(_time_attack("craft", "CAF attack", craft_call, "caf", params,
                     math.ceil(sizes["craft"] / config.craft.batch_size), repeats))
  train = config.denoiser
  steps_per_epoch = sizes["craft"] // train.batch_size
  denoiser_batch = _random_batch(train.batch_size, size, num_classes, 3)
  denoiser_batch = (np.clip(denoiser_batch[0] + 8 / 255, 0, 1),) + denoiser_batch

  def batch_of(name):  # with the natural images' targets when the pipeline precomputes them
    target_fn = pipeline.natural_target_fn(config, classifier, name)
    if target_fn is None:
      return denoiser_batch
    return denoiser_batch + (np.asarray(target_fn(variables, *denoiser_batch[1:])),)

  if "train_denoiser" in stages:
    states = factory.denoiser_states(config, jax.random.key(3), steps_per_epoch, dtype)
    add(_train_step_time("train_denoiser", "denoiser + discriminator step",
                         denoiser_train.make_step_fn(pipeline.denoiser_step(config, classifier)),
                         states, batch_of("cafd"), variables,
                         train.num_epochs * steps_per_epoch, mesh, config, repeats))
  if "train_baselines" in stages:
    for name in pipeline.baselines_to_train(config):
      state, step = pipeline.baseline_state_and_step(config, classifier, name,
                                                     jax.random.key(4), steps_per_epoch)
      add(_train_step_time("train_baselines", f"{name} denoiser step",
                           denoiser_train.make_step_fn(step), state, batch_of(name), variables,
                           train.num_epochs * steps_per_epoch, mesh, config, repeats))
  if "evaluate" in stages:
    for row in evaluation_times(config, classifier, variables, sizes["eval"], num_classes,
                                local, repeats):
      add(row)
  return rows


def evaluation_times(config, classifier, classifier_variables, num_examples: int,
                     num_classes: int, mesh, repeats: int) -> list[StageTime]:
  """Each attack of ``config.eval.attacks`` (unseen threat model) and the defenses' predictions."""
  defense_names = config_checks.split_names(config.eval.defenses)
  denoisers = {name: factory.denoiser(config) for name in defense_names
               if name in evaluate.DENOISERS}
  variables = {"classifier": classifier_variables}
  for name in denoisers:
    variables[name] = common.variables_of(factory.baseline_denoiser_state(
        config, jax.random.key(5), 1))
  variables = parallel.replicate(variables, mesh)
  batch_size = config.eval.batch_size
  images, labels = (jax.device_put(a, parallel.batch_sharding(mesh)) for a in
                    _random_batch(batch_size, config.data.image_size, num_classes, 6))
  batches = math.ceil(num_examples / batch_size)
  attack_names = config_checks.split_names(config.eval.attacks)
  rows = []
  for name in attack_names:
    def attack_call(params, name=name):
      attack = evaluate.build_attack(name, config, classifier, params=params, mesh=mesh)
      return lambda: attack(variables, images, labels, jax.random.key(7))

    rows.append(_time_attack("evaluate", f"{name} attack", attack_call, name,
                             evaluate.attack_params(name, config), batches, repeats))
  predictors = evaluate.defense_predictors(
      classifier, evaluate.preprocessors(defense_names, denoisers, config))
  for name, predict in predictors.items():
    seconds, compile_seconds = _median_seconds(lambda p=predict: p(variables, images), repeats)
    rows.append(StageTime("evaluate", f"predict behind {name}", batches * len(attack_names),
                          seconds, compile_seconds))
  return rows


def skipped_evaluation(config: ml_collections.ConfigDict) -> list[str]:
  """What the evaluate stage of ``config`` runs that ``measure`` does not time."""
  skipped = [f"threat model {name}" for name in config_checks.split_names(config.eval.threat_models)
             if name != "unseen"]
  if config.eval.get("sweep_eps", ()):
    skipped.append(f"eps sweep of {config.eval.sweep_attack} ({len(config.eval.sweep_eps)} budgets)")
  skipped += [f"transfer target {path}" for path in config.eval.get("transfer_workdirs", ())]
  return skipped


def _duration(seconds: float) -> str:
  if seconds < 120:
    return f"{seconds:.1f} s"
  if seconds < 2 * 3600:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


def format_row(row: StageTime, dtype: str, num_devices: int) -> str:
  text = (f"{row.stage:>16}  {row.part:<40} {row.call_seconds:9.3f} s x {row.calls:>7}"
          f" = {_duration(row.total_seconds):>9}  (compile {row.compile_seconds:.0f} s)")
  tflops, mfu = hardware.utilisation(row.flops, row.call_seconds, dtype, num_devices)
  if tflops is not None:
    text += f"  {tflops:.3f} TFLOP/s"
  if mfu is not None:
    text += f"  MFU {100 * mfu:.1f}%"
  return text


def summary(rows: list[StageTime]) -> list[str]:
  """Per-stage totals and the whole pipeline."""
  totals = {}
  for row in rows:
    totals[row.stage] = totals.get(row.stage, 0.0) + row.total_seconds
  lines = [f"{stage:>16}  {_duration(seconds)}" for stage, seconds in totals.items()]
  lines.append(f"{'pipeline':>16}  {_duration(sum(totals.values()))}")
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.ERROR)
  config = _CONFIG.value
  try:
    config_checks.validate(config)
  except config_checks.ConfigError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  sizes = set_sizes(config, _NUM_TRAIN.value, _NUM_TEST.value)
  print(hardware.host_line(), flush=True)
  print(f"devices {jax.devices()}  compute dtype {config.compute_dtype}  examples {sizes}  "
        f"XLA_FLAGS {os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  rows = measure(config, _NUM_TRAIN.value, _NUM_TEST.value, _NUM_CLASSES.value, _REPEATS.value)
  for line in summary(rows):
    print(line)
  for item in skipped_evaluation(config):
    print(f"not timed: {item}")
  if _OUT.value:
    with open(_OUT.value, "w") as file:
      json.dump([dict(dataclasses.asdict(row), total_seconds=row.total_seconds) for row in rows],
                file, indent=2)


if __name__ == "__main__":
  app.run(main)
