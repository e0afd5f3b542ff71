"""Robust accuracy of defended classifiers: attacks x defenses x threat models.

Threat models (named in every result row):

* ``unseen`` (the paper's main setting): the attack sees only the bare classifier; its
  adversarial examples are then classified behind each defense.
* ``bpda``: the attack runs through the defense with the identity as its gradient.
* ``white_box``: end-to-end gradients through a differentiable defense (the denoisers, the
  median filter); for non-differentiable ones (bit depth, JPEG) this is BPDA, and the row
  says ``"gradient": "bpda"``.

The undefended classifier is the same model under every threat model, so it is attacked once
(under ``unseen``); the CAF attack runs only under ``unseen``.
"""

import dataclasses
import functools
import hashlib
import json
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from cafd_jax import attacks, data, defenses, parallel
from cafd_jax import budget as budgets
from cafd_jax.attacks import registry, wrappers
from cafd_jax.train import denoiser as denoiser_train

ATTACKS = ("none", "caf") + tuple(registry.ATTACKS)
# learned defenses, all the same U-Net
DENOISERS = ("cafd", denoiser_train.CAF_LOSS_DENOISER) + denoiser_train.BASELINES
DEFENSES = ("none",) + DENOISERS + tuple(defenses.TRANSFORMS)
THREAT_MODELS = ("unseen", "bpda", "white_box")
LogitsFn = Callable[[jnp.ndarray], jnp.ndarray]
Preprocess = Callable[[dict, jnp.ndarray], jnp.ndarray]  # (variables, images) -> images


def logits_fn(classifier: nn.Module, variables: dict) -> LogitsFn:
  """Inference-mode logits of a classifier."""
  return lambda images: classifier.apply(variables, images)


def bind(jitted: Callable, variables: Any) -> Callable:
  """``jitted(variables, *args)`` as a function of ``*args``.

  Model variables travel as jit arguments rather than closure constants, so large models are
  not baked into every compiled program.
  """
  return functools.partial(jitted, variables)


def preprocessors(names: Sequence[str], denoisers: dict[str, nn.Module],
                  config: ml_collections.ConfigDict) -> dict[str, Preprocess]:
  """For each defense, ``preprocess(variables, images)``; ``variables`` as in evaluate()."""
  table = {"none": lambda variables, x: x}
  for name, module in denoisers.items():
    table[name] = lambda variables, x, m=module, n=name: m.apply(variables[n], x)
  for name, transform in defenses.TRANSFORMS.items():
    params = dict(config.eval[name]) if name in config.eval else {}
    table[name] = lambda variables, x, t=transform, p=params: t(x, **p)
  return {name: table[name] for name in names}


def differentiable(defense: str) -> bool:
  return defenses.DIFFERENTIABLE.get(defense, True)


def defense_predictors(classifier: nn.Module, preprocess: dict[str, Preprocess]
                       ) -> dict[str, Callable]:
  """For each defense, a jitted ``predict(variables, images) -> classes``."""

  def predict(variables, images, pre):
    return jnp.argmax(classifier.apply(variables["classifier"], pre(variables, images)), -1)

  return {name: jax.jit(functools.partial(predict, pre=pre)) for name, pre in preprocess.items()}


def attacked_logits(classifier: nn.Module, variables: dict, threat_model: str,
                    preprocess: Preprocess | None, defense: str) -> LogitsFn:
  """What the attacker differentiates under a threat model, for one defense."""
  classify = logits_fn(classifier, variables["classifier"])
  if threat_model == "unseen" or defense == "none":
    return classify
  purify = functools.partial(preprocess, variables)
  if threat_model == "bpda" or not differentiable(defense):
    return wrappers.bpda(purify, classify)
  return lambda x: classify(purify(x))


_ATTACK_BATCH_ARGS = (False, True, True, False)  # (variables, x, y, key): x and y split


def caf_attack(config: ml_collections.ConfigDict, classifier: nn.Module, params: dict,
               mesh: Mesh | None = None) -> Callable:
  """A jitted ``attack(classifier_variables, x, y, key)``: the CAF attack with ``params``; with a
  ``mesh``, batches split over its devices."""

  def attack(variables, x, y, key):
    caf_fn = denoiser_train.classifier_caf_fn(
        classifier, variables, **denoiser_train.caf_options(config.caf, config.caf.attack_kind),
        upsample=False)
    return attacks.caf_attack(caf_fn, x, y, key, **params)

  return parallel.jit_batched(attack, mesh, _ATTACK_BATCH_ARGS)


def attack_params(name: str, config: ml_collections.ConfigDict) -> dict:
  return dict(config.eval[name]) if name in config.eval else {}


def attack_budget(name: str, params: dict) -> float | None:
  """The budget a row reports as ``eps``: L-inf/L2 radius, or the capped Wasserstein radius."""
  if name == "none":
    return 0.0
  if name == "wasserstein":
    return params.get("max_eps")
  if name == "caf" or registry.NORMS.get(name) in ("linf", "l2"):
    return params.get("eps")
  return params.get("max_norm")  # minimal-norm attacks: None unless a budget was set


def build_attack(name: str, config: ml_collections.ConfigDict, classifier: nn.Module,
                 threat_model: str = "unseen", defense: str = "none",
                 preprocess: Preprocess | None = None,
                 params: dict | None = None, mesh: Mesh | None = None) -> Callable:
  """A jitted ``attack(variables, x, y, key) -> x_adv``; ``variables`` as in evaluate().

  Parameters from ``params``, else ``config.eval.<name>``, else the attack's defaults. With a
  ``mesh``, batches are split over its devices.
  """
  params = attack_params(name, config) if params is None else params
  if name == "none":
    return lambda variables, x, y, key: x
  if name == "caf":
    if threat_model != "unseen":
      raise ValueError("the CAF attack is evaluated under the unseen threat model only")
    caf = caf_attack(config, classifier, params, mesh)
    return lambda variables, x, y, key: caf(variables["classifier"], x, y, key)
  if name in registry.ATTACKS:
    attack = registry.get(name)

    def run(variables, x, y, key):
      target = attacked_logits(classifier, variables, threat_model, preprocess, defense)
      return attack(target, x, y, key, **params)

    return parallel.jit_batched(run, mesh, _ATTACK_BATCH_ARGS)
  raise ValueError(f"eval.attacks: unknown attack {name!r}; choose from {ATTACKS}.")


@dataclasses.dataclass
class _Run:
  """One attack run of the grid and its counts so far (``rounds`` of batches done)."""

  run_index: int
  name: str
  params: dict
  threat: str
  defense: str | None
  judged: dict[str, Callable]
  run_id: str
  key: jax.Array  # folded with each batch's index
  rounds: int = 0
  seen: int = 0
  correct: dict[str, int] = dataclasses.field(default_factory=dict)
  attack: Callable | None = None

  def progress(self, num_batches: int) -> dict:
    """What ``finished_runs`` keeps of the run: its counts on the first ``batches``."""
    return {"batches": min(self.rounds * jax.process_count(), num_batches), "seen": self.seen,
            "correct": dict(self.correct)}

  def restore(self, progress: dict, num_batches: int, num_rounds: int) -> bool:
    """Continues from ``progress``, unless its batches end inside a round of this process
    count (an earlier run on other processes): then the run starts again."""
    batches = int(progress["batches"])
    if batches < num_batches and batches % jax.process_count():
      return False
    self.rounds = num_rounds if batches == num_batches else batches // jax.process_count()
    self.seen = int(progress["seen"])
    self.correct = {name: int(count) for name, count in progress["correct"].items()}
    return True

  def rows(self, model_name: str) -> list[dict]:
    """One row per defense judged, on the ``seen`` examples; none before the first batch."""
    if not self.seen:
      return []
    eps = attack_budget(self.name, self.params)
    rows = []
    for defense_name in self.judged:
      row = {"attack": self.name, "defense": defense_name, "threat_model": self.threat,
             "model": model_name, "eps": eps, "accuracy": self.correct[defense_name] / self.seen,
             "n": self.seen}
      if self.threat == "white_box" and not differentiable(defense_name):
        row["gradient"] = "bpda"
      rows.append(row)
    return rows


def _round_counts(attack: Callable, predictors: dict[str, Callable], dataset: data.Dataset,
                  variables: dict, batch_size: int, round_index: int, key: jax.Array,
                  mesh: Mesh) -> tuple[dict[str, int], int]:
  """Correct predictions of each predictor on the attack's examples of one round of batches
  (one batch per process: round r holds batches r * P .. r * P + P - 1), summed over processes,
  and the number of examples the round held."""
  correct = np.zeros(len(predictors) + 1, np.int64)  # the last entry counts the examples
  batch_index = round_index * jax.process_count() + jax.process_index()
  start = batch_index * batch_size
  if start < len(dataset):
    (x, y), count = parallel.put_local_batch((dataset.images[start:start + batch_size],
                                              dataset.labels[start:start + batch_size]), mesh)
    x_adv = attack(variables, x, y, jax.random.fold_in(key, batch_index))
    for index, predict in enumerate(predictors.values()):
      correct[index] = int(jnp.sum(predict(variables, x_adv)[:count] == y[:count]))
    correct[-1] = count
  correct = parallel.sum_over_processes(correct)
  return dict(zip(predictors, (int(c) for c in correct[:-1]))), int(correct[-1])


def evaluate(config: ml_collections.ConfigDict, dataset: data.Dataset, classifier: nn.Module,
             denoisers: dict[str, nn.Module], variables: dict, defense_names: Sequence[str],
             attack_names: Sequence[str], threat_models: Sequence[str], key: jax.Array,
             log: Callable[[str], None] = print, model_label: str | None = None,
             mesh: Mesh | None = None, budget: budgets.Budget | None = None,
             on_run: Callable[[list[dict]], None] | None = None,
             finished_runs: dict[str, dict] | None = None,
             identity: dict | None = None) -> list[dict]:
  """One row per (attack, eps, threat model, defense) with its accuracy on its ``n`` examples.

  Batches are split over ``mesh`` (default: this process's devices, ``parallel.local_mesh``);
  several processes take one batch each per round and sum their counts.

  ``denoisers`` maps each learned defense in ``defense_names`` (``cafd``, ``pixel``, ``hgd``) to
  its module; ``variables`` is ``{"classifier": ..., <denoiser name>: ...}``.
  ``config.eval.sweep_eps`` adds rows for ``config.eval.sweep_attack`` at each listed budget
  (accuracy-vs-eps curves), under ``config.eval.sweep_threat_models`` (empty: all of
  ``threat_models``). Rows name the model ``model_label`` (default: config.model.name).

  The grid goes round by round of ``config.eval.batch_size`` examples: every attack run takes
  the first batch, then every run the second, and so on. Within a round the runs go threat
  model by threat model, in the order of ``threat_models`` (unseen first by default), each in
  the order of ``attack_names`` then the sweep; the adaptive threat models attack only
  ``config.eval.adaptive_attacks`` (empty: all) through ``config.eval.adaptive_defenses``.
  With a ``budget``, no batch starts once it is spent (after the first): a cut grid keeps every
  run, on fewer examples (the first rounds; each row's ``n``), instead of dropping its last runs.
  ``on_run(rows so far)`` is called after each batch of a run.

  ``finished_runs`` (id -> counts) holds runs done, in whole or in part, before: a run whose id
  (``run_id``: the run, ``identity``, the model's name and the set) is there continues after the
  rounds it has; each batch done now updates it, before ``on_run``.
  """
  mesh = mesh or parallel.local_mesh()
  variables = parallel.replicate(variables, mesh)
  preprocess = preprocessors(defense_names, denoisers, config)
  predictors = defense_predictors(classifier, preprocess)
  model_name = model_label or config.model.name
  batch_size = config.eval.batch_size
  num_batches = -(-len(dataset) // batch_size)
  num_rounds = -(-num_batches // jax.process_count())
  runs = []
  for run_index, name, params, threat, defense in attack_runs(config, defense_names,
                                                              attack_names, threat_models):
    judged = predictors if defense is None else {defense: predictors[defense]}
    run_key = jax.random.fold_in(key, run_index)
    if threat != "unseen":  # unseen keeps the keys of earlier, unseen-only reports
      run_key = jax.random.fold_in(run_key, THREAT_MODELS.index(threat))
    runs.append(_Run(run_index, name, params, threat, defense, judged,
                     run_id(identity or {}, model_name, run_index, name, params, threat, defense,
                            list(judged), len(dataset)),
                     run_key, correct={defense_name: 0 for defense_name in judged}))
  rows = lambda: [row for run in runs for row in run.rows(model_name)]
  for run in runs:
    if (finished_runs is not None and run.run_id in finished_runs
        and run.restore(finished_runs[run.run_id], num_batches, num_rounds)):
      if parallel.is_primary():
        log(f"[evaluate] {run.threat:>9}  attack {run.name:>10}  kept from an earlier run "
            f"({run.rounds}/{num_rounds} rounds, n={run.seen})")
  if on_run is not None and any(run.seen for run in runs):
    on_run(rows())
  attacked = 0
  for round_index in range(num_rounds):
    for done, run in enumerate(runs):
      if run.rounds > round_index:
        continue
      if attacked and budget is not None and budget.spent():
        budget.cut(model=model_name, round=f"{round_index + 1}/{num_rounds}",
                   run=f"{done}/{len(runs)}",
                   next=f"{run.name} {run.threat} {run.defense or 'all'}")
        if parallel.is_primary():
          log(f"[evaluate] time budget of {budget.max_seconds:g}s spent in round "
              f"{round_index + 1} of {num_rounds}, before attack run {done + 1} of {len(runs)} "
              f"for {model_name}: rows on n={sorted({r.seen for r in runs})} examples")
        return rows()
      attacked += 1
      if run.attack is None:
        run.attack = build_attack(run.name, config, classifier, run.threat,
                                  run.defense or "none", preprocess.get(run.defense), run.params,
                                  mesh)
      correct, count = _round_counts(run.attack, run.judged, dataset, variables, batch_size,
                                     round_index, run.key, mesh)
      run.correct = {name: run.correct[name] + correct[name] for name in run.judged}
      run.seen += count
      run.rounds += 1
      if finished_runs is not None:
        finished_runs[run.run_id] = run.progress(num_batches)
      if parallel.is_primary():
        _log_run(run, num_rounds, model_name, log)
      if on_run is not None:
        on_run(rows())
  return rows()


def _log_run(run: _Run, num_rounds: int, model_name: str, log: Callable[[str], None]) -> None:
  """A line per defense once the run is complete; one progress line after its earlier rounds."""
  eps = attack_budget(run.name, run.params)
  eps_text = "" if eps is None else f"  eps {eps:.4g}"
  if run.rounds < num_rounds:
    accuracies = "  ".join(f"{name} {run.correct[name] / run.seen:.4f}" for name in run.judged)
    log(f"[evaluate] {run.threat:>9}  attack {run.name:>10}{eps_text}  round {run.rounds}/"
        f"{num_rounds}  n={run.seen}  {accuracies}")
    return
  for row in run.rows(model_name):
    log(f"[evaluate] {run.threat:>9}  attack {run.name:>10}{eps_text}  defense "
        f"{row['defense']:>9}  accuracy {row['accuracy']:.4f}  (n={run.seen})")


def run_id(identity: dict, model_name: str, run_index: int, name: str, params: dict,
           threat: str, defense: str | None, judged: Sequence[str], num_examples: int) -> str:
  """A digest of everything an attack run's rows depend on: ``identity`` (the config parts and
  checkpoints behind them, ``pipeline``'s choice), the model, the run's place in the grid (its
  PRNG key), the attack and its parameters, the threat model, the defenses judged and the set
  size (what ``finished_runs`` keeps of a run: its counts on its first batches)."""
  described = json.dumps(["counts by batch", identity, model_name, run_index, name, params, threat, defense,
                          list(judged), num_examples], sort_keys=True, default=repr)
  return hashlib.sha256(described.encode("utf-8")).hexdigest()[:20]


def attack_runs(config: ml_collections.ConfigDict, defense_names: Sequence[str],
                attack_names: Sequence[str], threat_models: Sequence[str]) -> list[tuple]:
  """The attack runs of the grid in order: (run index, attack, params, threat model, defense
  attacked or None for unseen). The run index (the attack's place in ``attack_names`` + sweep)
  picks the run's PRNG key, so keys do not depend on which runs are chosen. A score-based
  attack (no gradients) runs under ``bpda`` only when ``white_box`` is not in the grid."""
  runs = [(name, attack_params(name, config), threat_models) for name in attack_names]
  sweep = config.eval.get("sweep_attack", "")
  sweep_threats = sweep_threat_models(threat_models, config.eval.get("sweep_threat_models", ""))
  for eps in config.eval.get("sweep_eps", ()):
    runs.append((sweep, dict(attack_params(sweep, config), eps=float(eps)), sweep_threats))
  adaptive = adaptive_targets(defense_names, config.eval.get("adaptive_defenses", ""))
  adaptive_attacks = [name.strip() for name in config.eval.get("adaptive_attacks", "").split(",")
                      if name.strip()]
  plan = []
  for threat in threat_models:
    for run_index, (name, params, run_threats) in enumerate(runs):
      if threat not in run_threats:
        continue
      if threat != "unseen" and (name in ("none", "caf")
                                 or (adaptive_attacks and name not in adaptive_attacks)):
        continue
      if threat == "bpda" and name in registry.SCORE_BASED and "white_box" in threat_models:
        continue  # no gradient to replace: its BPDA run would repeat the white-box one
      for defense in [None] if threat == "unseen" else adaptive:
        plan.append((run_index, name, params, threat, defense))
  return plan


def sweep_threat_models(threat_models: Sequence[str], chosen: str) -> list[str]:
  """The threat models of the eps sweep: those named in ``chosen`` (comma-separated; empty means
  every one) among ``threat_models``."""
  names = [name.strip() for name in chosen.split(",") if name.strip()]
  return [name for name in threat_models if not names or name in names]


def adaptive_targets(defense_names: Sequence[str], adaptive_defenses: str) -> list[str]:
  """The defenses attacked under the adaptive threat models: those of ``adaptive_defenses``
  (comma-separated; empty means every one) among ``defense_names``, never ``none``."""
  chosen = [name.strip() for name in adaptive_defenses.split(",") if name.strip()]
  return [name for name in defense_names if name != "none" and (not chosen or name in chosen)]


def cam_figure_arrays(config: ml_collections.ConfigDict, dataset: data.Dataset,
                      classifier: nn.Module, preprocess: dict[str, Preprocess], variables: dict,
                      key: jax.Array, count: int = 8) -> dict:
  """Arrays of the CAM picture: natural, adversarial (``eval.figure_attack``, unseen) and each
  denoised version of the first ``count`` test images, with their CAMs of the predicted class.

  Returns ``images`` [K, N, H, W, 3], ``cams`` [K, N, H, W], ``titles`` [K], ``predicted``
  [K, N] and ``labels`` [N] (class names), as ``figures.cam_grid`` draws them.
  """
  name = config.eval.get("figure_attack", "pgd")
  x = jnp.asarray(dataset.images[:count])
  y = jnp.asarray(dataset.labels[:count])
  x_adv = build_attack(name, config, classifier)(variables, x, y, key)
  panels = {"natural": x, f"adversarial ({name})": x_adv}
  for defense, pre in preprocess.items():
    if defense != "none":
      panels[f"{defense}(adversarial)"] = pre(variables, x_adv)
  cam_options = denoiser_train.caf_options(config.caf, "cam") | {"class_source": "prediction"}
  cam_fn = jax.jit(denoiser_train.classifier_caf_fn(classifier, variables["classifier"],
                                                    **cam_options))
  classify = jax.jit(logits_fn(classifier, variables["classifier"]))
  names = np.asarray(dataset.class_names)
  images = [np.asarray(jnp.clip(panel, 0, 1)) for panel in panels.values()]
  return {"images": np.stack(images),
          "cams": np.stack([np.asarray(cam_fn(image, y)) for image in images]),
          "titles": np.asarray(list(panels)),
          "predicted": np.stack([names[np.asarray(jnp.argmax(classify(image), -1))]
                                 for image in images]),
          "labels": names[np.asarray(y)]}
