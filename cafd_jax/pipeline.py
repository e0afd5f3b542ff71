"""The CAFD pipeline, stage by stage; each stage resumes from what the workdir holds.

  train_classifier -> DIR/checkpoints/classifier      (Orbax, one per epoch)
  craft            -> DIR/craft/chunk_*.npy           (CAF adversarial training set, per chunk)
  train_denoiser   -> DIR/checkpoints/denoiser        (Orbax: denoiser + discriminator)
  train_baselines  -> DIR/checkpoints/denoiser_NAME   (pixel / hgd / cafd_caf, if named in
                                                       eval.defenses)
  evaluate         -> DIR/report.json, DIR/report.md, DIR/figures/  (restores checkpoints only)
  report           -> report.md and figures rebuilt from DIR/report.json, nothing recomputed

Each stage may have a time budget (``config.max_seconds.<stage>``, ``cafd_jax/budget.py``);
DIR/stages.json records each stage's budget, seconds and where it was cut, or to how many
epochs a training run was fitted (``config.fit_epochs_to_budget``; the plan is kept in
``X.plan.json`` beside its checkpoints). What a stage makes from an earlier stage's output
records that output's identity beside it (``X.lineage.json``: the classifier checkpoint step,
the number of crafted examples); when a rerun finds that the inputs changed (a budget-cut stage
continued), the old output is moved aside, never deleted, and the stage starts afresh.
"""

import collections
import functools
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from cafd_jax import budget as budgets
from cafd_jax import (augment, checkpoint, config_checks, data, evaluate, factory, figures,
                      imported, io_utils, parallel, report)
from cafd_jax import workdir as workdir_guard
from cafd_jax.models import taps
from cafd_jax.train import classifier as classifier_train
from cafd_jax.train import common
from cafd_jax.train import denoiser as denoiser_train
from cafd_jax.train import loop

CLASSIFIER_DIR = "checkpoints/classifier"
DENOISER_DIR = "checkpoints/denoiser"
CRAFT_DIR = "craft"
CLASSES_FILE = "classes.json"
EVAL_RUNS_FILE = "eval_runs.json"  # each attack run's counts on its batches done, by evaluate.run_id
# Fields of config.eval that choose which runs the grid holds, not what a run computes.
_GRID_FIELDS = ("attacks", "defenses", "threat_models", "adaptive_defenses", "adaptive_attacks",
                "sweep_attack", "sweep_eps", "sweep_threat_models", "figure_attack",
                "transfer_workdirs", "transfer_attacks")


# Each stage's PRNG stream; append new stages so that earlier runs keep their keys.
_KEY_ORDER = ("train_classifier", "craft", "train_denoiser", "evaluate", "train_baselines")
_FIGURE_KEY = 2**20  # folded into the evaluate key for the CAM picture's attack


def _stage_key(config: ml_collections.ConfigDict, stage: str) -> jax.Array:
  return jax.random.fold_in(jax.random.key(config.seed), _KEY_ORDER.index(stage))


def baseline_dir(name: str) -> str:
  return f"{DENOISER_DIR}_{name}"


def denoiser_dir(name: str) -> str:
  """Where denoiser ``name`` (cafd, cafd_caf or a baseline) keeps its checkpoints."""
  return DENOISER_DIR if name == "cafd" else baseline_dir(name)


def baselines_to_train(config: ml_collections.ConfigDict) -> list[str]:
  """The denoisers besides ``cafd`` named in ``config.eval.defenses``: the baselines, then
  ``cafd_caf`` (appended last, so that earlier runs' baselines keep their PRNG keys)."""
  names = config_checks.split_names(config.eval.defenses)
  return [name for name in denoiser_train.BASELINES + (denoiser_train.CAF_LOSS_DENOISER,)
          if name in names]


def _is_cafd_pair(name: str) -> bool:
  """Whether denoiser ``name`` trains as CAFD: a (denoiser, discriminator) pair."""
  return name in ("cafd", denoiser_train.CAF_LOSS_DENOISER)


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


def denoiser_source(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where evaluation reads the denoisers: ``eval.denoiser_workdir`` (e.g. to attack another
  run's denoisers on a new grid without touching its report), else this workdir."""
  return config.eval.get("denoiser_workdir", "") or workdir


def restore_denoiser(config: ml_collections.ConfigDict, workdir: str, name: str = "cafd") -> dict:
  """Inference variables of a trained denoiser (cafd, cafd_caf or a baseline), from its
  checkpoint alone."""
  directory = os.path.join(workdir, denoiser_dir(name))
  what = "denoiser" if name == "cafd" else f"{name} denoiser"
  if _is_cafd_pair(name):
    template = factory.denoiser_states(config, jax.random.key(0), 1)
    return common.variables_of(checkpoint.require_latest(directory, template, what)[0])
  template = factory.baseline_denoiser_state(config, jax.random.key(0), 1)
  return common.variables_of(checkpoint.require_latest(directory, template, what))


def classifier_step(config: ml_collections.ConfigDict, workdir: str) -> int | None:
  """The step of the classifier checkpoint that later stages use (None: not trained yet)."""
  return checkpoint.latest_step(os.path.join(upstream(config, workdir), CLASSIFIER_DIR))


def _lineage_path(directory: str) -> str:
  return io_utils.normalised(directory) + ".lineage.json"


def _plan_path(directory: str) -> str:
  return io_utils.normalised(directory) + ".plan.json"


def fitted(config: ml_collections.ConfigDict, section: str, stage: str, checkpoint_dir: str,
           budget: budgets.Budget | None, steps_per_epoch: int,
           time_steps: Callable[[], tuple[float, float]]) -> ml_collections.ConfigDict:
  """``config`` with ``config.<section>.num_epochs`` lowered to the whole epochs that the
  stage's budget holds, when ``config.fit_epochs_to_budget`` is on and the budget would
  otherwise cut the run: the schedule (one-cycle, lookahead, ...) is then that of the shorter
  run and ends where it should. ``time_steps()`` gives (first step with compilation, seconds
  per step), measured once on a fresh start; the plan is kept beside the checkpoints, so a
  resumed run keeps it, with any budget or none. Otherwise ``config`` itself."""
  planned = config[section].num_epochs
  if checkpoint.latest_step(checkpoint_dir) is not None:  # begun: continues as it began
    plan = io_utils.read_json(_plan_path(checkpoint_dir), missing=None)
    if not plan or plan.get("planned_epochs") != planned:
      return config
  elif (not config.get("fit_epochs_to_budget", False) or budget is None or not budget.limited
        or planned <= 1):
    return config
  else:
    first_seconds, step_seconds = time_steps()
    epochs = budgets.agreed(budgets.epochs_within(budget.remaining() - first_seconds,
                                                  step_seconds, steps_per_epoch, planned))
    plan = {"planned_epochs": planned, "epochs": epochs,
            "step_seconds": round(step_seconds, 4), "budget_seconds": budget.max_seconds}
    if parallel.is_primary():
      io_utils.write_json(_plan_path(checkpoint_dir), plan)
      print(f"[{stage}] {step_seconds:.3g}s a step here ({first_seconds:.0f}s for the first, "
            f"compiled): {epochs} of {planned} epochs fit the {budget.remaining():.0f}s left "
            f"of its budget", flush=True)
  if plan["epochs"] >= planned:
    return config
  if budget is not None:
    budget.fit(stage=stage, epochs=f"{plan['epochs']}/{planned}")
  config = config.copy_and_resolve_references()
  config[section].num_epochs = plan["epochs"]
  return config


def read_lineage(directory: str) -> dict | None:
  """What ``directory``'s contents were made from (None if unrecorded)."""
  return io_utils.read_json(_lineage_path(directory), missing=None)


def keep_or_supersede(directory: str, lineage: dict, stage: str) -> None:
  """Records that ``directory`` is made from ``lineage``. If it holds output made from other
  inputs (e.g. crafted against a classifier that has trained further since), that output is
  moved to ``DIRECTORY.superseded-K`` with one line saying so, and the stage starts afresh.
  Output made before lineages were recorded is kept as it is."""
  lineage = json.loads(json.dumps(lineage))
  recorded = read_lineage(directory)
  parallel.barrier(f"{stage} lineage read")  # before the primary moves or writes anything
  if parallel.is_primary():
    if recorded is not None and recorded != lineage and io_utils.path(directory).exists():
      index = 1
      while io_utils.path(f"{io_utils.normalised(directory)}.superseded-{index}").exists():
        index += 1
      moved = f"{io_utils.normalised(directory)}.superseded-{index}"
      io_utils.rename(directory, moved)
      io_utils.rename(_lineage_path(directory), _lineage_path(moved))
      if io_utils.path(_plan_path(directory)).exists():
        io_utils.rename(_plan_path(directory), _plan_path(moved))
      print(f"[{stage}] {directory} was made from {recorded}, not {lineage}; moved to {moved}, "
            f"starting afresh", flush=True)
    io_utils.write_json(_lineage_path(directory), lineage)
  parallel.barrier(f"{stage} lineage written")


def _fit_options(config: ml_collections.ConfigDict, mesh, train_set: data.Dataset) -> dict:
  """The keyword arguments of ``loop.fit`` that every training stage shares (``global_size``
  set when ``train_set`` is this process's shard)."""
  return dict(seed=config.seed, log_every_steps=config.log_every_steps, mesh=mesh,
              fsdp=config.parallel.fsdp, prefetch_batches=config.parallel.prefetch_batches,
              global_size=None if train_set.shard == (0, 1) else train_set.num_global)


def classifier_step_fn(config: ml_collections.ConfigDict, steps_per_epoch: int = 1) -> Callable:
  """The classifier train step of ``config.classifier`` in ``loop.fit``'s form."""
  train = config.classifier
  lookahead_steps = None
  if train.get("lookahead"):
    lookahead_steps = (train.get("lookahead_start_epoch", 3) * steps_per_epoch,
                       train.num_epochs * steps_per_epoch)
  adversary = None
  if train.get("adversary", "none") == "pgd":
    ramp_steps = round(train.pgd.get("ramp_fraction", 0.0) * train.num_epochs * steps_per_epoch)
    adversary = (float(train.pgd.eps), float(train.pgd.step_size), int(train.pgd.steps),
                 ramp_steps)
  return classifier_train.make_step_fn(train.augment, train.accumulation_steps,
                                       train.get("label_smoothing", 0.0),
                                       train.get("crop_padding", 4), lookahead_steps,
                                       train.get("crop_pad_mode", "constant"), adversary,
                                       steps_per_epoch)


def _classifier_start(config, train_set: data.Dataset, steps_per_epoch: int):
  """The classifier's state before training: initialised, whitened, imported as configured."""
  train = config.classifier
  state = factory.classifier_state(config, train_set.num_classes, _stage_key(config, "train_classifier"),
                                   steps_per_epoch, factory.training_dtype(config))
  if train.get("whiten_patches"):
    state = classifier_train.with_whitened_patches(state, train_set.images, config.model.mean,
                                                   config.model.std)
  if train.get("init_from"):
    state = imported.with_variables(state, imported.read_variables(train.init_from),
                                    train.init_from)
  return state


def train_classifier(config, workdir, train_set: data.Dataset, test_set: data.Dataset,
                     mesh, budget: budgets.Budget | None = None) -> None:
  train = config.classifier
  steps_per_epoch = _steps_per_epoch(train_set.num_global, train.batch_size)
  state = _classifier_start(config, train_set, steps_per_epoch)
  checkpoint_dir = os.path.join(workdir, CLASSIFIER_DIR)
  if train.get("init_from"):
    if train.num_epochs == 0:  # the imported classifier as it is: checkpoint 0 for the stages
      if checkpoint.latest_step(checkpoint_dir) is None:
        checkpoints = checkpoint.manager(checkpoint_dir)
        try:
          checkpoint.save(checkpoints, 0, state)
        finally:
          checkpoints.close()
      print(f"[train_classifier] using {train.init_from} as it is (classifier.num_epochs=0)",
            flush=True)
  if train.num_epochs:
    arrays = (train_set.images, train_set.labels)
    if train.get("flip", "random") == "alternating":
      arrays += (augment.first_epoch_flips(len(train_set), config.seed),)
    options = dict(arrays=arrays, batch_size=train.batch_size,
                   key=_stage_key(config, "train_classifier"),
                   **_fit_options(config, mesh, train_set))
    step_fn = classifier_step_fn(config, steps_per_epoch)  # one object: compiled once
    run_config = fitted(config, "classifier", "train_classifier", checkpoint_dir, budget,
                        steps_per_epoch, lambda: loop.time_steps(state=state, step_fn=step_fn,
                                                                 **options))
    if run_config is not config:  # a shorter schedule: another optimiser and step
      state = _classifier_start(run_config, train_set, steps_per_epoch)
      step_fn = classifier_step_fn(run_config, steps_per_epoch)
    state = loop.fit(stage="train_classifier", state=state, step_fn=step_fn,
                     num_epochs=run_config.classifier.num_epochs, checkpoint_dir=checkpoint_dir,
                     workdir=workdir, budget=budget, **options)
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
_CHUNK_FILE = re.compile(r"(?:shard_(\d+)of(\d+)_)?chunk_(\d+)\.npy")


def _chunk_path(directory: str, chunk: int, shard: tuple[int, int]) -> str:
  if shard == (0, 1):
    return os.path.join(directory, f"chunk_{chunk:05d}.npy")
  return os.path.join(directory, f"shard_{shard[0]:05d}of{shard[1]:05d}_chunk_{chunk:05d}.npy")


def craft(config, workdir, train_set: data.Dataset, budget: budgets.Budget | None = None) -> None:
  """CAF adversarial examples of the denoiser's training set, saved chunk by chunk; processes
  take the chunks round-robin (or, given only their shard of the data, craft all of it), each
  splitting its chunks over its own devices. With a ``budget``, no chunk starts once it is
  spent; the chunks done are kept, and a rerun crafts the rest."""
  directory = os.path.join(workdir, CRAFT_DIR)
  settings_path = os.path.join(directory, "settings.json")
  settings = _craft_settings(config, train_set.shard)
  if io_utils.path(settings_path).exists():
    if io_utils.read_json(settings_path) != json.loads(json.dumps(settings)):
      raise config_checks.ConfigError(
          f"{directory} was crafted with other settings; delete it or use another --workdir.")
  classifier = factory.classifier(config, train_set.num_classes)
  variables = restore_classifier(config, workdir, train_set.num_classes)
  keep_or_supersede(directory, {"classifier_step": classifier_step(config, workdir)}, "craft")
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
    if io_utils.path(path).exists() or not (num_shards > 1 or parallel.owns(chunk)):
      continue
    # At least one chunk per invocation. Not budget.spent(): processes craft different chunks
    # and need not agree here.
    if done_now and budget is not None and budget.limited and budget.remaining() == 0:
      budget.cut(chunk=f"{chunk}/{num_chunks}", examples=f"{chunk * batch_size}/{len(train_set)}")
      print(f"[craft] time budget of {budget.max_seconds:g}s spent: stopped before chunk "
            f"{chunk + 1}/{num_chunks}; the chunks written are kept", flush=True)
      break
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
  """Each crafted chunk (memory-mapped) with the training-set indices of its rows. Chunk C of
  a set (or of a process's shard) holds its rows from C x craft.batch_size on (settings.json), so
  a chunk missing before it (crafting stopped early on one process) moves no rows."""
  settings_path = os.path.join(directory, "settings.json")
  chunk_size = None
  if io_utils.path(settings_path).exists():
    chunk_size = io_utils.read_json(settings_path).get("batch_size")
  offsets = collections.Counter()  # without settings: rows seen so far per set or shard
  folder = io_utils.path(directory)
  names = sorted(path.name for path in folder.glob("*chunk_*.npy")) if folder.exists() else []
  for name in names:  # chunk order
    match = _CHUNK_FILE.fullmatch(name)
    if not match:
      continue
    shard = (int(match[1]), int(match[2])) if match[1] else (0, 1)
    chunk = io_utils.load_npy(os.path.join(directory, name), mmap=True)
    start = int(match[3]) * chunk_size if chunk_size else offsets[shard]
    offsets[shard] += len(chunk)
    yield chunk, shard[0] + shard[1] * np.arange(start, start + len(chunk))


def crafted_prefix(workdir: str, dataset: data.Dataset) -> int:
  """How many leading examples of ``dataset``'s whole set have crafted examples (all of them
  unless crafting was cut by its budget); a clear error if the chunks belong to another set."""
  directory = os.path.join(workdir, CRAFT_DIR)
  total = dataset.num_global
  covered = np.zeros(total, bool)
  for _, indices in _crafted_chunks(directory):
    if indices.size and indices.max() >= total:
      raise checkpoint.CheckpointError(
          f"{directory} holds crafted examples for a set larger than the {total} of this "
          f"config; use the config it was crafted with, or another --workdir.")
    covered[indices] = True
  return total if covered.all() else int(np.argmin(covered))


def load_crafted(workdir: str, dataset: data.Dataset) -> tuple[data.Dataset, np.ndarray]:
  """The crafted adversarial examples of ``dataset`` (the whole set or one process's shard), in
  its order, from chunks written by one process, several, or several with their own shards;
  with the part of ``dataset`` they cover: all of it, or (crafting cut by its budget) the
  first examples, as many as were crafted."""
  directory = os.path.join(workdir, CRAFT_DIR)
  count, total = crafted_prefix(workdir, dataset), dataset.num_global
  dataset = dataset.take(count)
  if len(dataset) == 0:
    raise checkpoint.CheckpointError(
        f"{directory} holds crafted examples for the first {count} of {total} "
        f"examples, none of those this process needs; run the craft stage first with the "
        f"same --workdir." if count else
        f"{directory} holds no crafted examples of this set; run the craft stage first with "
        f"the same --workdir.")
  index, processes = dataset.shard
  crafted, found = None, np.zeros(len(dataset), bool)
  for chunk, indices in _crafted_chunks(directory):
    mine = (indices % processes == index) & (indices < count)
    if mine.any():
      if crafted is None:
        crafted = np.empty((len(dataset),) + chunk.shape[1:], chunk.dtype)
      slots = (indices[mine] - index) // processes
      crafted[slots], found[slots] = chunk[mine], True
  if crafted is None or not found.all():
    raise checkpoint.CheckpointError(
        f"{directory} holds {int(found.sum())} of the {len(dataset)} crafted examples this "
        f"process needs; run the craft stage again with the same --workdir.")
  return dataset, crafted


def _denoiser_data(config, workdir: str, train_set: data.Dataset,
                   stage: str) -> tuple[data.Dataset, np.ndarray]:
  """The crafted set the denoisers train on (``load_crafted``), with its natural examples."""
  crafted_set, x_adv = load_crafted(upstream(config, workdir), train_set)
  if crafted_set.num_global < train_set.num_global:
    print(f"[{stage}] training on the {crafted_set.num_global} of {train_set.num_global} "
          f"examples crafted (crafting stopped early, e.g. by its time budget; the craft stage "
          f"crafts the rest)", flush=True)
  return crafted_set, x_adv


def _denoiser_lineage(config, workdir: str, crafted_set: data.Dataset) -> dict:
  """What a denoiser trained now is made from: classifier step and crafted set."""
  crafted_with = read_lineage(os.path.join(upstream(config, workdir), CRAFT_DIR)) or {}
  return {"classifier_step": classifier_step(config, workdir),
          "crafted_examples": crafted_set.num_global,
          "crafted_with_classifier_step": crafted_with.get("classifier_step")}


def _caf_loss(config: ml_collections.ConfigDict, name: str) -> tuple[str | None, dict]:
  """The CAF kind denoiser ``name``'s loss compares and the other options of that loss
  (``denoiser_train.caf_options``); None and {} when it is not a CAF loss."""
  kind = {"cafd": config.caf.loss_kind,
          denoiser_train.CAF_LOSS_DENOISER: denoiser_train.CAF_LOSS_KIND}.get(name)
  if kind is None:
    return None, {}
  options = denoiser_train.caf_options(config.caf, kind)
  return options.pop("kind"), options


def natural_target_fn(config: ml_collections.ConfigDict, classifier, name: str) -> Callable | None:
  """``denoiser_train.make_target_fn`` for denoiser ``name`` of ``config``; None when
  ``denoiser.precompute_targets`` is off or ``name`` has no target (pixel)."""
  if not config.denoiser.get("precompute_targets", True):
    return None
  caf_kind, options = _caf_loss(config, name)
  return denoiser_train.make_target_fn(classifier, name, caf_kind=caf_kind, **options)


def natural_targets(config: ml_collections.ConfigDict, classifier, classifier_variables: dict,
                    name: str, train_set: data.Dataset, stage: str,
                    checkpoint_dir: str) -> np.ndarray | None:
  """The classifier-side targets of denoiser ``name``'s loss for every natural image of
  ``train_set`` (``denoiser_train.make_target_fn``), computed once so that the train steps
  skip that classifier pass; None when ``denoiser.precompute_targets`` is off, ``name`` has
  none (pixel) or its training in ``checkpoint_dir`` is complete."""
  planned = config.denoiser.num_epochs * _steps_per_epoch(train_set.num_global,
                                                         config.denoiser.batch_size)
  target_fn = natural_target_fn(config, classifier, name)
  if target_fn is None or (checkpoint.latest_step(checkpoint_dir) or 0) >= planned:
    return None
  start = time.time()
  targets = common.apply_in_batches(functools.partial(target_fn, classifier_variables),
                                    (train_set.images, train_set.labels),
                                    config.eval.batch_size)
  print(f"[{stage}] {name}: natural targets precomputed, {len(targets)} x "
        f"{list(targets.shape[1:])} {targets.dtype} ({targets.nbytes / 2**20:.0f} MiB, "
        f"{time.time() - start:.0f}s)", flush=True)
  return targets


def _denoiser_arrays(x_adv: np.ndarray, train_set: data.Dataset,
                     targets: np.ndarray | None) -> tuple[np.ndarray, ...]:
  """The per-example arrays of a denoiser's ``loop.fit`` (``denoiser_train.make_step_fn``)."""
  arrays = (x_adv, train_set.images, train_set.labels)
  return arrays if targets is None else arrays + (targets,)


def denoiser_step(config: ml_collections.ConfigDict, classifier, name: str = "cafd"
                  ) -> Callable:
  """The jitted denoiser + discriminator step (``make_train_step``) of CAFD denoiser ``name``
  ("cafd" or ``denoiser_train.CAF_LOSS_DENOISER``), with its CAF loss (``_caf_loss``)."""
  caf_kind, options = _caf_loss(config, name)
  return denoiser_train.make_train_step(
      classifier, caf_kind=caf_kind, caf_weight=config.denoiser.caf_weight,
      gan_weight=config.denoiser.gan_weight, adversary=white_box_adversary(config), **options)


def white_box_adversary(config: ml_collections.ConfigDict
                        ) -> denoiser_train.WhiteBoxAdversary | None:
  """The online white-box adversary of the CAFD steps (``denoiser.adversary``), or None."""
  if config.denoiser.get("adversary", "none") != "white_box":
    return None
  options = config.denoiser.white_box
  return denoiser_train.WhiteBoxAdversary(
      eps=float(options.eps), step_size=float(options.step_size), steps=int(options.steps),
      fraction=float(options.get("fraction", 1.0)))


def train_denoiser(config, workdir, train_set: data.Dataset, mesh,
                   budget: budgets.Budget | None = None) -> None:
  checkpoint_dir = os.path.join(workdir, DENOISER_DIR)
  train_set, x_adv = _denoiser_data(config, workdir, train_set, "train_denoiser")
  keep_or_supersede(checkpoint_dir, _denoiser_lineage(config, workdir, train_set),
                    "train_denoiser")
  classifier = factory.classifier(config, train_set.num_classes)
  classifier_variables = restore_classifier(config, workdir, train_set.num_classes)
  key = _stage_key(config, "train_denoiser")
  steps_per_epoch = _steps_per_epoch(train_set.num_global, config.denoiser.batch_size)
  make_state_and_step = lambda run_config: (
      factory.denoiser_states(run_config, key, steps_per_epoch, factory.training_dtype(run_config)),
      denoiser_step(run_config, classifier))
  _fit_denoiser(config, "train_denoiser", "cafd", make_state_and_step, classifier,
                classifier_variables, train_set, x_adv, key, checkpoint_dir, workdir, mesh, budget)


def _fit_denoiser(config: ml_collections.ConfigDict, stage: str, name: str,
                  make_state_and_step: Callable[[ml_collections.ConfigDict], tuple[Any, Callable]],
                  classifier, classifier_variables: dict, train_set: data.Dataset,
                  x_adv: np.ndarray, key: jax.Array, checkpoint_dir: str, workdir: str, mesh,
                  budget: budgets.Budget | None) -> None:
  """Trains denoiser ``name`` (fresh state and jitted train step:
  ``make_state_and_step(config)``) on the crafted pairs with ``loop.fit``, for the epochs
  ``fitted`` leaves of ``config.denoiser.num_epochs``."""
  targets = {}

  def arrays(run_config: ml_collections.ConfigDict) -> tuple[np.ndarray, ...]:
    if "natural" not in targets:  # computed once, and not at all when training is complete
      targets["natural"] = natural_targets(run_config, classifier, classifier_variables, name,
                                           train_set, stage, checkpoint_dir)
    return _denoiser_arrays(x_adv, train_set, targets["natural"])

  options = dict(frozen=classifier_variables, batch_size=config.denoiser.batch_size, key=key,
                 **_fit_options(config, mesh, train_set))
  state, step = make_state_and_step(config)
  step_fn = denoiser_train.make_step_fn(step)  # one object: compiled once
  run_config = fitted(config, "denoiser", stage, checkpoint_dir, budget,
                      _steps_per_epoch(train_set.num_global, config.denoiser.batch_size),
                      lambda: loop.time_steps(state=state, step_fn=step_fn,
                                              arrays=arrays(config), **options))
  if run_config is not config:  # a shorter schedule: another optimiser and step
    state, step = make_state_and_step(run_config)
    step_fn = denoiser_train.make_step_fn(step)
  loop.fit(stage=stage, state=state, step_fn=step_fn, arrays=arrays(run_config),
           num_epochs=run_config.denoiser.num_epochs, checkpoint_dir=checkpoint_dir,
           workdir=workdir, budget=budget, **options)


def baseline_state_and_step(config: ml_collections.ConfigDict, classifier, name: str,
                            key: jax.Array, steps_per_epoch: int) -> tuple:
  """(fresh state, jitted train step) of denoiser ``name`` of ``baselines_to_train``."""
  dtype = factory.training_dtype(config)
  if _is_cafd_pair(name):
    return (factory.denoiser_states(config, key, steps_per_epoch, dtype),
            denoiser_step(config, classifier, name))
  return (factory.baseline_denoiser_state(config, key, steps_per_epoch, dtype),
          denoiser_train.make_baseline_train_step(classifier, name))


def train_baselines(config, workdir, train_set: data.Dataset, mesh,
                    budget: budgets.Budget | None = None) -> None:
  """Each denoiser of ``baselines_to_train`` (pixel, hgd: their own losses; cafd_caf: CAFD's
  step with the CAF loss), on CAFD's crafted data with CAFD's U-Net and schedule; a budget is
  shared out equally among those still to train."""
  names = baselines_to_train(config)
  if not names:
    print("[train_baselines] no baseline denoiser in eval.defenses; nothing to train", flush=True)
    return
  classifier = factory.classifier(config, train_set.num_classes)
  classifier_variables = restore_classifier(config, workdir, train_set.num_classes)
  train = config.denoiser
  train_set, x_adv = _denoiser_data(config, workdir, train_set, "train_baselines")
  lineage = _denoiser_lineage(config, workdir, train_set)
  for index, name in enumerate(names):
    checkpoint_dir = os.path.join(workdir, baseline_dir(name))
    keep_or_supersede(checkpoint_dir, lineage, f"train_{name}_denoiser")
    key = jax.random.fold_in(_stage_key(config, "train_baselines"), index)
    steps_per_epoch = _steps_per_epoch(train_set.num_global, train.batch_size)
    make_state_and_step = lambda run_config, name=name, key=key: baseline_state_and_step(
        run_config, classifier, name, key, steps_per_epoch)
    _fit_denoiser(config, f"train_{name}_denoiser", name, make_state_and_step, classifier,
                  classifier_variables, train_set, x_adv, key, checkpoint_dir, workdir, mesh,
                  None if budget is None else budget.share(len(names) - index))


def _transfer_targets(config: ml_collections.ConfigDict) -> list[tuple]:
  """(config, workdir) of each run in ``eval.transfer_workdirs``: its classifier is attacked
  behind this run's defenses (a denoiser trained against one model, used before another).
  Its rows name the model ``NAME@WORKDIR``."""
  targets = []
  for other in config.eval.get("transfer_workdirs", ()):
    path = os.path.join(other, "config.json")
    if not io_utils.path(path).exists():
      raise config_checks.ConfigError(
          f"config.eval.transfer_workdirs: {path} not found; train that classifier first "
          f"(main.py --workdir {other} --config.stages=train_classifier).")
    other_config = ml_collections.ConfigDict(workdir_guard.read_recorded(other))
    target = ml_collections.ConfigDict(config.to_dict())
    # Its classifier is where its own run keeps it, whatever this run's upstream_workdir, in
    # the form its own model and training settings give its checkpoint (optimiser state).
    target.model, target.classifier = other_config.model, other_config.classifier
    target.upstream_workdir = other_config.get("upstream_workdir", "")
    target.eval.attacks = config.eval.get("transfer_attacks", "") or config.eval.attacks
    targets.append((target, other))
  return targets


def read_finished_runs(workdir: str) -> dict[str, list[dict]]:
  """The rows of the attack runs an earlier evaluation of ``workdir`` finished (by run id)."""
  return io_utils.read_json(os.path.join(workdir, EVAL_RUNS_FILE), missing={})


def _run_identity(target: ml_collections.ConfigDict, target_dir: str,
                  denoiser_steps: dict) -> dict:
  """What an attack run's rows depend on besides the run itself: the config's meaningful parts,
  the evaluation settings other than the grid's choice of runs, and the checkpoints."""
  values = target.to_dict()
  return {"config": {group: values.get(group) for group in workdir_guard.MEANINGFUL},
          "eval": {name: value for name, value in values["eval"].items()
                   if name not in _GRID_FIELDS},
          "classifier_step": classifier_step(target, target_dir),
          "denoiser_steps": denoiser_steps}


def run_evaluation(config, workdir, test_set: data.Dataset,
                   budget: budgets.Budget | None = None,
                   on_rows: Callable[[list[dict]], None] | None = None) -> list[dict]:
  """The evaluation grid for this run's classifier and every transfer target; also writes the
  arrays of the CAM picture. With a ``budget``, no batch of an attack run (nor the picture)
  starts once it is spent; the rows done are returned. ``on_rows(all rows so far)`` after each batch of an
  attack run. Each run's counts are kept in ``DIR/eval_runs.json`` after each of its batches;
  a rerun continues every run whose settings and checkpoints match (``evaluate.run_id``) after
  the batches it has, so a killed or budget-cut evaluation continues where it stopped."""
  defense_names = config_checks.split_names(config.eval.defenses)
  own_classifier = restore_classifier(config, workdir, test_set.num_classes)  # the first stage
  denoisers, denoiser_variables = {}, {}
  for name in evaluate.DENOISERS:
    if name in defense_names:
      denoisers[name] = factory.denoiser(config)
      denoiser_variables[name] = restore_denoiser(config, denoiser_source(config, workdir), name)
  key = _stage_key(config, "evaluate")
  results = []
  spent = lambda: budget is not None and budget.spent()
  finished_runs = read_finished_runs(workdir)
  denoiser_steps = {name: checkpoint.latest_step(os.path.join(denoiser_source(config, workdir),
                                                             denoiser_dir(name)))
                    for name in denoisers}

  def after_run(rows: list[dict]) -> None:
    if parallel.is_primary():
      io_utils.write_json(os.path.join(workdir, EVAL_RUNS_FILE), finished_runs)
    if on_rows is not None:
      on_rows(rows)

  for index, (target, target_dir) in enumerate([(config, workdir)] + _transfer_targets(config)):
    label = None
    if index:
      label = f"{target.model.name}@{io_utils.path(target_dir).name}"
      if spent():
        budget.cut(model=label, run="0")
        print(f"[evaluate] time budget spent: {label} is not attacked", flush=True)
        continue
    classifier = factory.classifier(target, test_set.num_classes)
    classifier_variables = (restore_classifier(target, target_dir, test_set.num_classes)
                            if index else own_classifier)
    variables = {"classifier": classifier_variables, **denoiser_variables}
    earlier = list(results)
    results += evaluate.evaluate(
        target, test_set, classifier, denoisers, variables, defense_names,
        config_checks.split_names(target.eval.attacks),
        config_checks.split_names(config.eval.threat_models),
        jax.random.fold_in(key, index) if index else key, model_label=label, budget=budget,
        on_run=lambda rows: after_run(earlier + rows), finished_runs=finished_runs,
        identity=_run_identity(target, target_dir, denoiser_steps))
    if index == 0 and spent():
      budget.cut(figure="cam_grid")
      print("[evaluate] time budget spent: the CAM picture is not drawn", flush=True)
      stale = os.path.join(workdir, report.FIGURES_DIR, figures.CAM_ARRAYS)
      if parallel.is_primary() and io_utils.path(stale).exists():
        io_utils.path(stale).unlink()  # an earlier evaluation's picture: not this report's
    elif index == 0 and parallel.is_primary():
      arrays = evaluate.cam_figure_arrays(
          config, test_set, classifier, evaluate.preprocessors(defense_names, denoisers, config),
          variables, jax.random.fold_in(key, _FIGURE_KEY))
      io_utils.write_npz(os.path.join(workdir, report.FIGURES_DIR, figures.CAM_ARRAYS), arrays)
  return results


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Runs the stages named in ``config.stages`` in pipeline order, as the workdir's only
  writer (``workdir_guard.Lock``) and only if its stored output means what ``config`` says
  (``workdir_guard.check_config``)."""
  config_checks.validate(config)
  workdir_guard.check_storage(workdir)
  try:
    parallel.initialize(config)
  except ValueError as error:
    raise config_checks.ConfigError(str(error)) from error
  lock = workdir_guard.Lock(workdir)
  try:
    if parallel.is_primary() and io_utils.path(workdir).is_dir():
      lock.acquire()  # at once, before data loading; a new workdir is made (and locked) later
    _run_stages(config, workdir, lock)
  finally:
    lock.release()


def _run_stages(config: ml_collections.ConfigDict, workdir: str,
                lock: workdir_guard.Lock) -> None:
  stages = config_checks.split_names(config.stages)
  if stages == ["report"]:  # nothing to load or recompute
    report.render(workdir)
    print(f"[pipeline] report and figures rebuilt from {os.path.join(workdir, report.REPORT_JSON)}",
          flush=True)
    return
  workdir_guard.check_config(workdir, config.to_dict())
  started = time.perf_counter()
  train_set = test_set = None
  if {"train_classifier", "craft", "train_denoiser", "train_baselines"} & set(stages):
    train_set = load_data(config, "train", config.data.num_train, train_shard(config))
  if {"train_classifier", "evaluate"} & set(stages):
    test_set = load_data(config, "test", config.data.num_test)
  if imported.is_imported(config.model.name):
    model = factory.classifier(config, (train_set or test_set).num_classes)
    imported.check_caf_layer(config, model, jax.eval_shape(
        model.init, jax.random.key(0), factory.sample_images(config)))
  mesh = parallel.make_mesh()
  primary = parallel.is_primary()
  if primary:
    lock.acquire()
    io_utils.write_json(os.path.join(workdir, workdir_guard.CONFIG_FILE), config.to_dict())
    class_names = (train_set or test_set).class_names
    io_utils.write_json(os.path.join(workdir, CLASSES_FILE), list(class_names))
    print(f"[pipeline] stages {','.join(stages)}  devices {jax.devices()}  "
          f"{parallel.describe(mesh)}  workdir {workdir}", flush=True)
    if train_set is not None and train_set.shard != (0, 1):
      print(f"[pipeline] training data sharded: process {train_set.shard[0]} of "
            f"{train_set.shard[1]} holds {len(train_set)} of {train_set.num_global} examples",
            flush=True)
  stage_seconds, stage_records = {}, {}

  def timed(stage: str, function, *args):
    """Runs one stage under its time budget, then records and prints what it took."""
    budget = budgets.Budget(budgets.stage_seconds(config, stage))
    value = function(*args, budget)
    record = budget.record()
    stage_seconds[stage], stage_records[stage] = record["seconds"], record
    if primary:
      budgets.write_record(workdir, stage, record)
      print(f"[pipeline] {stage} took {record['seconds']:.1f}s ({budgets.describe(record)})",
            flush=True)
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

    def write_report(results: list[dict], final: bool) -> None:
      """report.json and report.md of ``results``; until the grid is done, marked partial
      (``metadata.partial``) and without figures, so a killed run still leaves its rows."""
      run_info = report.metadata(config.seed, time.perf_counter() - started)
      run_info["stage_seconds"] = stage_seconds  # the stages of this invocation
      # Budget, seconds and cuts of each stage's latest run in this workdir, this one included.
      run_info["stages"] = budgets.read_records(workdir) | stage_records
      run_info["partial"] = not final
      if primary:
        report.write(workdir, config.to_dict(), results,
                     {"wall_time_s": run_info["wall_time_s"], "metadata": run_info},
                     draw_figures=final)

    results = timed("evaluate", lambda *args: run_evaluation(
        *args, on_rows=lambda rows: write_report(rows, final=False)), config, workdir, eval_set)
    write_report(results, final=True)
    if primary:
      print(f"[pipeline] report written to {os.path.join(workdir, 'report.md')}", flush=True)
  if "report" in stages and primary:
    report.render(workdir)
  if primary:
    print(f"[pipeline] done in {time.perf_counter() - started:.1f}s", flush=True)
