"""The CAFD pipeline, stage by stage; each stage resumes from what the workdir holds.

  train_classifier -> DIR/checkpoints/classifier      (Orbax, one per epoch)
  craft            -> DIR/craft/chunk_*.npy           (CAF adversarial training set, per chunk)
  train_denoiser   -> DIR/checkpoints/denoiser        (Orbax: denoiser + discriminator)
  train_baselines  -> DIR/checkpoints/denoiser_NAME   (pixel / hgd, if named in eval.defenses)
  evaluate         -> DIR/report.json, DIR/report.md, DIR/figures/  (restores checkpoints only)
  report           -> report.md and figures rebuilt from DIR/report.json, nothing recomputed
"""

import collections
import glob
import json
import os
import re
import time
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np

from cafd_jax import (checkpoint, config_checks, data, evaluate, factory, figures, io_utils,
                      parallel, report)
from cafd_jax.models import taps
from cafd_jax.train import classifier as classifier_train
from cafd_jax.train import common
from cafd_jax.train import denoiser as denoiser_train
from cafd_jax.train import loop

CLASSIFIER_DIR = "checkpoints/classifier"
DENOISER_DIR = "checkpoints/denoiser"
CRAFT_DIR = "craft"
CLASSES_FILE = "classes.json"


# Each stage's PRNG stream; append new stages so that earlier runs keep their keys.
_KEY_ORDER = ("train_classifier", "craft", "train_denoiser", "evaluate", "train_baselines")
_FIGURE_KEY = 2**20  # folded into the evaluate key for the CAM picture's attack


def _stage_key(config: ml_collections.ConfigDict, stage: str) -> jax.Array:
  return jax.random.fold_in(jax.random.key(config.seed), _KEY_ORDER.index(stage))


def baseline_dir(name: str) -> str:
  return f"{DENOISER_DIR}_{name}"


def baselines_to_train(config: ml_collections.ConfigDict) -> list[str]:
  """The baseline denoisers named in ``config.eval.defenses``."""
  names = config_checks.split_names(config.eval.defenses)
  return [name for name in denoiser_train.BASELINES if name in names]


def _count(value: int) -> int | None:
  return value or None


def load_data(config: ml_collections.ConfigDict, split: str, num_examples: int,
              shard: tuple[int, int] | None = None) -> data.Dataset:
  return data.load_split(config.data.source, split, image_size=config.data.image_size,
                         num_examples=_count(num_examples), seed=config.seed, shard=shard)


def train_shard(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """This process's shard of the training data with ``data.shard_per_process``, else None."""
  if not config.data.get("shard_per_process", False) or jax.process_count() == 1:
    return None
  return jax.process_index(), jax.process_count()


def _steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return max(1, num_examples // batch_size)


def upstream(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the classifier checkpoint and the crafted set live: ``config.upstream_workdir``
  (a finished run that ablations share) or this run's own workdir."""
  return config.get("upstream_workdir", "") or workdir


def restore_classifier(config: ml_collections.ConfigDict, workdir: str, num_classes: int) -> dict:
  """Inference variables of the trained classifier, from its checkpoint alone."""
  template = factory.classifier_state(config, num_classes, jax.random.key(0), 1)
  directory = os.path.join(upstream(config, workdir), CLASSIFIER_DIR)
  state = checkpoint.require_latest(directory, template, "classifier")
  return common.variables_of(state)


def restore_denoiser(config: ml_collections.ConfigDict, workdir: str, name: str = "cafd") -> dict:
  """Inference variables of a trained denoiser (cafd or a baseline), from its checkpoint alone."""
  if name == "cafd":
    template = factory.denoiser_states(config, jax.random.key(0), 1)
    states = checkpoint.require_latest(os.path.join(workdir, DENOISER_DIR), template, "denoiser")
    return common.variables_of(states[0])
  template = factory.baseline_denoiser_state(config, jax.random.key(0), 1)
  state = checkpoint.require_latest(os.path.join(workdir, baseline_dir(name)), template,
                                    f"{name} denoiser")
  return common.variables_of(state)


def _fit_options(config: ml_collections.ConfigDict, mesh, train_set: data.Dataset) -> dict:
  """The keyword arguments of ``loop.fit`` that every training stage shares (``global_size``
  set when ``train_set`` is this process's shard)."""
  return dict(seed=config.seed, log_every_steps=config.log_every_steps, mesh=mesh,
              fsdp=config.parallel.fsdp, prefetch_batches=config.parallel.prefetch_batches,
              global_size=None if train_set.shard == (0, 1) else train_set.num_global)


def train_classifier(config, workdir, train_set: data.Dataset, test_set: data.Dataset,
                     mesh) -> None:
  train = config.classifier
  state = factory.classifier_state(config, train_set.num_classes, _stage_key(config, "train_classifier"),
                                   _steps_per_epoch(train_set.num_global, train.batch_size),
                                   factory.training_dtype(config))
  state = loop.fit(stage="train_classifier", state=state,
                   step_fn=classifier_train.make_step_fn(train.augment, train.accumulation_steps),
                   arrays=(train_set.images, train_set.labels), batch_size=train.batch_size,
                   num_epochs=train.num_epochs, key=_stage_key(config, "train_classifier"),
                   checkpoint_dir=os.path.join(workdir, CLASSIFIER_DIR), workdir=workdir,
                   **_fit_options(config, mesh, train_set))
  classifier = factory.classifier(config, train_set.num_classes)  # float32, as evaluation
  classify = evaluate.bind(jax.jit(classifier.apply),
                           parallel.to_host(common.variables_of(state)))
  predictions = classifier_train.predict(classify, test_set.images, config.eval.batch_size)
  if parallel.is_primary():
    print(f"[train_classifier] test accuracy {np.mean(predictions == test_set.labels):.4f} "
          f"(n={len(test_set)})", flush=True)


def _craft_settings(config, shard: tuple[int, int]) -> dict:
  settings = dict(config.craft)
  settings.update(denoiser_train.caf_options(config.caf, config.caf.attack_kind),
                  seed=config.seed, source=config.data.source)
  for name, default in (("weights", "cam"), ("feature_layer", taps.DEFAULT_LAYER)):
    if settings[name] == default:  # as written before these options existed
      del settings[name]
  if shard != (0, 1):  # each process crafts its own shard: other files, other keys
    settings["process_shards"] = shard[1]
  return settings


# Crafted chunk files: "chunk_C.npy" (the whole set, in order) or "shard_PofN_chunk_C.npy" (the
# C-th chunk of process P's shard, examples P, P + N, ...).
_CHUNK_FILE = re.compile(r"(?:shard_(\d+)of(\d+)_)?chunk_\d+\.npy")


def _chunk_path(directory: str, chunk: int, shard: tuple[int, int]) -> str:
  if shard == (0, 1):
    return os.path.join(directory, f"chunk_{chunk:05d}.npy")
  return os.path.join(directory, f"shard_{shard[0]:05d}of{shard[1]:05d}_chunk_{chunk:05d}.npy")


def craft(config, workdir, train_set: data.Dataset) -> None:
  """CAF adversarial examples of the denoiser's training set, saved chunk by chunk; processes
  take the chunks round-robin (or, given only their shard of the data, craft all of it), each
  splitting its chunks over its own devices."""
  directory = os.path.join(workdir, CRAFT_DIR)
  settings_path = os.path.join(directory, "settings.json")
  settings = _craft_settings(config, train_set.shard)
  if os.path.exists(settings_path):
    with open(settings_path) as file:
      if json.load(file) != json.loads(json.dumps(settings)):
        raise config_checks.ConfigError(
            f"{directory} was crafted with other settings; delete it or use another --workdir.")
  classifier = factory.classifier(config, train_set.num_classes)
  variables = restore_classifier(config, workdir, train_set.num_classes)
  parallel.barrier("craft settings read")  # before the primary writes them
  if parallel.is_primary():
    io_utils.write_json(settings_path, settings)
  params = {name: config.craft[name] for name in ("eps", "step_size", "steps", "random_start")}
  mesh = parallel.local_mesh()
  attack = evaluate.bind(evaluate.caf_attack(config, classifier, params, mesh),
                         parallel.replicate(variables, mesh))
  batch_size, key = config.craft.batch_size, _stage_key(config, "craft")
  num_chunks = -(-len(train_set) // batch_size)
  start_time, done_now = time.perf_counter(), 0
  shard_index, num_shards = train_set.shard  # (0, 1) unless this process holds only its shard
  for chunk in range(num_chunks):
    path = _chunk_path(directory, chunk, train_set.shard)
    if os.path.exists(path) or not (num_shards > 1 or parallel.owns(chunk)):
      continue
    (images, labels), count = parallel.put_local_batch(
        (train_set.images[chunk * batch_size:(chunk + 1) * batch_size],
         train_set.labels[chunk * batch_size:(chunk + 1) * batch_size]), mesh)
    x_adv = attack(images, labels, jax.random.fold_in(key, chunk * num_shards + shard_index))
    io_utils.write_npy(path, np.asarray(x_adv)[:count])
    done_now += count
    rate = done_now / (time.perf_counter() - start_time)
    eta = (len(train_set) - (chunk + 1) * batch_size) / rate
    print(f"[craft] chunk {chunk + 1}/{num_chunks}  {rate:.0f} img/s  ETA {max(eta, 0):.0f}s",
          flush=True)
  parallel.barrier("craft done")  # every process's chunks are written


def _crafted_chunks(directory: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Each crafted chunk (memory-mapped) with the training-set indices of its rows."""
  offsets = collections.Counter()  # rows seen so far per (whole set | process shard)
  for path in sorted(glob.glob(os.path.join(directory, "*chunk_*.npy"))):  # chunk order
    match = _CHUNK_FILE.fullmatch(os.path.basename(path))
    if not match:
      continue
    shard = (int(match[1]), int(match[2])) if match[1] else (0, 1)
    chunk = np.load(path, mmap_mode="r")
    local = np.arange(offsets[shard], offsets[shard] + len(chunk))
    offsets[shard] += len(chunk)
    yield chunk, shard[0] + shard[1] * local


def load_crafted(workdir: str, dataset: data.Dataset) -> np.ndarray:
  """The crafted adversarial examples of ``dataset`` (the whole set or one process's shard), in
  its order, from chunks written by one process, several, or several with their own shards."""
  directory = os.path.join(workdir, CRAFT_DIR)
  (index, count), total = dataset.shard, dataset.num_global
  crafted, found, size = None, np.zeros(len(dataset), bool), 0
  for chunk, indices in _crafted_chunks(directory):
    size = max(size, int(indices.max(initial=-1)) + 1)
    mine = (indices % count == index) & (indices < total)
    if mine.any():
      if crafted is None:
        crafted = np.empty((len(dataset),) + chunk.shape[1:], chunk.dtype)
      slots = (indices[mine] - index) // count
      crafted[slots], found[slots] = chunk[mine], True
  if crafted is None or not found.all() or size != total:
    raise checkpoint.CheckpointError(
        f"{directory} holds crafted examples for a set of {size} with {int(found.sum())} of the "
        f"{len(dataset)} this process needs (of {total}); run the craft stage first with the "
        f"same --workdir.")
  return crafted


def denoiser_step(config: ml_collections.ConfigDict, classifier) -> Callable:
  """The jitted CAFD denoiser + discriminator step of ``config`` (``make_train_step``)."""
  options = denoiser_train.caf_options(config.caf, config.caf.loss_kind)
  return denoiser_train.make_train_step(
      classifier, caf_kind=options.pop("kind"), caf_weight=config.denoiser.caf_weight,
      gan_weight=config.denoiser.gan_weight, **options)


def train_denoiser(config, workdir, train_set: data.Dataset, mesh) -> None:
  x_adv = load_crafted(upstream(config, workdir), train_set)
  classifier = factory.classifier(config, train_set.num_classes)
  classifier_variables = restore_classifier(config, workdir, train_set.num_classes)
  train = config.denoiser
  states = factory.denoiser_states(config, _stage_key(config, "train_denoiser"),
                                   _steps_per_epoch(train_set.num_global, train.batch_size),
                                   factory.training_dtype(config))
  loop.fit(stage="train_denoiser", state=states,
           step_fn=denoiser_train.make_step_fn(denoiser_step(config, classifier)),
           frozen=classifier_variables, arrays=(x_adv, train_set.images, train_set.labels),
           batch_size=train.batch_size, num_epochs=train.num_epochs,
           key=_stage_key(config, "train_denoiser"),
           checkpoint_dir=os.path.join(workdir, DENOISER_DIR), workdir=workdir,
           **_fit_options(config, mesh, train_set))


def train_baselines(config, workdir, train_set: data.Dataset, mesh) -> None:
  """Each baseline denoiser in eval.defenses, on CAFD's crafted data with CAFD's schedule."""
  names = baselines_to_train(config)
  if not names:
    print("[train_baselines] no baseline denoiser in eval.defenses; nothing to train", flush=True)
    return
  x_adv = load_crafted(upstream(config, workdir), train_set)
  classifier = factory.classifier(config, train_set.num_classes)
  classifier_variables = restore_classifier(config, workdir, train_set.num_classes)
  train = config.denoiser
  for index, name in enumerate(names):
    key = jax.random.fold_in(_stage_key(config, "train_baselines"), index)
    state = factory.baseline_denoiser_state(config, key, _steps_per_epoch(train_set.num_global,
                                                                          train.batch_size),
                                            factory.training_dtype(config))
    step = denoiser_train.make_baseline_train_step(classifier, name)
    loop.fit(stage=f"train_{name}_denoiser", state=state,
             step_fn=denoiser_train.make_step_fn(step), frozen=classifier_variables,
             arrays=(x_adv, train_set.images, train_set.labels), batch_size=train.batch_size,
             num_epochs=train.num_epochs, key=key,
             checkpoint_dir=os.path.join(workdir, baseline_dir(name)), workdir=workdir,
             **_fit_options(config, mesh, train_set))


def _transfer_targets(config: ml_collections.ConfigDict) -> list[tuple]:
  """(config, workdir) of each run in ``eval.transfer_workdirs``: its classifier is attacked
  behind this run's defenses (a denoiser trained against one model, used before another).
  Its rows name the model ``NAME@WORKDIR``."""
  targets = []
  for other in config.eval.get("transfer_workdirs", ()):
    path = os.path.join(other, "config.json")
    if not os.path.exists(path):
      raise config_checks.ConfigError(
          f"config.eval.transfer_workdirs: {path} not found; train that classifier first "
          f"(main.py --workdir {other} --config.stages=train_classifier).")
    with open(path) as file:
      other_config = ml_collections.ConfigDict(json.load(file))
    target = ml_collections.ConfigDict(config.to_dict())
    target.model = other_config.model
    targets.append((target, other))
  return targets


def run_evaluation(config, workdir, test_set: data.Dataset) -> list[dict]:
  """The evaluation grid for this run's classifier and every transfer target; also writes the
  arrays of the CAM picture."""
  defense_names = config_checks.split_names(config.eval.defenses)
  own_classifier = restore_classifier(config, workdir, test_set.num_classes)  # the first stage
  denoisers, denoiser_variables = {}, {}
  for name in evaluate.DENOISERS:
    if name in defense_names:
      denoisers[name] = factory.denoiser(config)
      denoiser_variables[name] = restore_denoiser(config, workdir, name)
  key = _stage_key(config, "evaluate")
  results = []
  for index, (target, target_dir) in enumerate([(config, workdir)] + _transfer_targets(config)):
    classifier = factory.classifier(target, test_set.num_classes)
    classifier_variables = (restore_classifier(target, target_dir, test_set.num_classes)
                            if index else own_classifier)
    variables = {"classifier": classifier_variables, **denoiser_variables}
    label = None
    if index:
      label = f"{target.model.name}@{os.path.basename(os.path.normpath(target_dir))}"
    results += evaluate.evaluate(target, test_set, classifier, denoisers, variables,
                                 defense_names, config_checks.split_names(config.eval.attacks),
                                 config_checks.split_names(config.eval.threat_models),
                                 jax.random.fold_in(key, index) if index else key,
                                 model_label=label)
    if index == 0 and parallel.is_primary():
      arrays = evaluate.cam_figure_arrays(
          config, test_set, classifier, evaluate.preprocessors(defense_names, denoisers, config),
          variables, jax.random.fold_in(key, _FIGURE_KEY))
      io_utils.write_npz(os.path.join(workdir, report.FIGURES_DIR, figures.CAM_ARRAYS), arrays)
  return results


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Runs the stages named in ``config.stages`` in pipeline order."""
  config_checks.validate(config)
  try:
    parallel.initialize(config)
  except ValueError as error:
    raise config_checks.ConfigError(str(error)) from error
  stages = config_checks.split_names(config.stages)
  if stages == ["report"]:  # nothing to load or recompute
    report.render(workdir)
    print(f"[pipeline] report and figures rebuilt from {os.path.join(workdir, report.REPORT_JSON)}",
          flush=True)
    return
  started = time.perf_counter()
  train_set = test_set = None
  if {"train_classifier", "craft", "train_denoiser", "train_baselines"} & set(stages):
    train_set = load_data(config, "train", config.data.num_train, train_shard(config))
  if {"train_classifier", "evaluate"} & set(stages):
    test_set = load_data(config, "test", config.data.num_test)
  mesh = parallel.make_mesh()
  primary = parallel.is_primary()
  if primary:
    os.makedirs(workdir, exist_ok=True)
    io_utils.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    class_names = (train_set or test_set).class_names
    io_utils.write_json(os.path.join(workdir, CLASSES_FILE), list(class_names))
    print(f"[pipeline] stages {','.join(stages)}  devices {jax.devices()}  "
          f"{parallel.describe(mesh)}  workdir {workdir}", flush=True)
    if train_set is not None and train_set.shard != (0, 1):
      print(f"[pipeline] training data sharded: process {train_set.shard[0]} of "
            f"{train_set.shard[1]} holds {len(train_set)} of {train_set.num_global} examples",
            flush=True)
  stage_seconds = {}

  def timed(stage: str, function, *args):
    stage_start = time.perf_counter()
    value = function(*args)
    stage_seconds[stage] = round(time.perf_counter() - stage_start, 1)
    if primary:
      print(f"[pipeline] {stage} took {stage_seconds[stage]:.1f}s", flush=True)
    return value

  if "train_classifier" in stages:
    timed("train_classifier", train_classifier, config, workdir, train_set, test_set, mesh)
  denoiser_set = train_set.take(_count(config.craft.num_examples)) if train_set else None
  if "craft" in stages:
    timed("craft", craft, config, workdir, denoiser_set)
  if "train_denoiser" in stages:
    timed("train_denoiser", train_denoiser, config, workdir, denoiser_set, mesh)
  if "train_baselines" in stages:
    timed("train_baselines", train_baselines, config, workdir, denoiser_set, mesh)
  if "evaluate" in stages:
    eval_set = test_set.take(_count(config.eval.num_examples))
    results = timed("evaluate", run_evaluation, config, workdir, eval_set)
    run_info = report.metadata(config.seed, time.perf_counter() - started)
    run_info["stage_seconds"] = stage_seconds  # the stages of this invocation
    if primary:
      report.write(workdir, config.to_dict(), results,
                   {"wall_time_s": run_info["wall_time_s"], "metadata": run_info})
      print(f"[pipeline] report written to {os.path.join(workdir, 'report.md')}", flush=True)
  if "report" in stages and primary:
    report.render(workdir)
  if primary:
    print(f"[pipeline] done in {time.perf_counter() - started:.1f}s", flush=True)
