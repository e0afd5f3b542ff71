"""Which (attack, threat model, defense) cells the evaluation grid selects."""

from cafd_jax import evaluate


def test_sweep_threat_models_default_to_all_and_keep_run_order():
  threats = ["unseen", "bpda", "white_box"]
  assert evaluate.sweep_threat_models(threats, "") == threats
  assert evaluate.sweep_threat_models(threats, "white_box, unseen") == ["unseen", "white_box"]
  assert evaluate.sweep_threat_models(["unseen"], "white_box") == []


def test_adaptive_targets_never_include_the_undefended_model():
  defenses = ["none", "cafd", "pixel", "jpeg"]
  assert evaluate.adaptive_targets(defenses, "") == ["cafd", "pixel", "jpeg"]
  assert evaluate.adaptive_targets(defenses, "none,cafd") == ["cafd"]


def test_square_runs_once_when_white_box_is_in_the_grid():
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  config = quickstart.get_config()
  config.eval.sweep_eps = ()
  config.eval.adaptive_attacks = ""

  def cells(threat_models):
    return {(name, threat) for _, name, _, threat, _ in evaluate.attack_runs(
        config, ["none", "cafd"], ["none", "pgd", "square"], threat_models)}

  assert ("square", "bpda") not in cells(["unseen", "white_box", "bpda"])
  assert {("square", "white_box"), ("pgd", "bpda")} <= cells(["unseen", "white_box", "bpda"])
  assert ("square", "bpda") in cells(["unseen", "bpda"])  # the only adaptive row it would get


def _ticks():
  """A clock that moves one second each time it is read."""
  now = iter(range(10**6))
  return lambda: float(next(now))


def test_a_budget_cut_grid_keeps_every_run_on_its_first_batches_and_resumes_to_the_whole():
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cafd_jax import budget, data, factory  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.eval.batch_size = 4
  config.eval.sweep_eps = ()
  config.eval.adaptive_defenses = config.eval.adaptive_attacks = ""
  rng = np.random.default_rng(0)
  dataset = data.Dataset(rng.uniform(size=(12, 32, 32, 3)).astype(np.float32),
                         rng.integers(0, 10, 12).astype(np.int32), tuple("abcdefghij"))
  classifier = factory.classifier(config, 10)
  variables = {"classifier": classifier.init(jax.random.key(0), factory.sample_images(config))}

  def grid(cut=None, finished=None, log=print, examples=dataset):
    return evaluate.evaluate(config, examples, classifier, {}, variables, ["none", "median"],
                             ["none", "pgd"], ["unseen", "white_box"], jax.random.key(1),
                             log=log, budget=cut, finished_runs=finished)

  whole = grid()
  assert {row["n"] for row in whole} == {12}
  assert len(whole) == 5  # none and pgd unseen, each behind both; pgd white-box through median

  # Clock reads: the start, then one per check before every batch but the first; the fourth
  # check finds 3 s spent: the first round (a batch of each of the three runs) is done.
  cut = budget.Budget(2.5, clock=_ticks())
  finished = {}
  first_round = grid(cut, finished)
  assert [(row["attack"], row["defense"], row["threat_model"]) for row in first_round] == [
      (row["attack"], row["defense"], row["threat_model"]) for row in whole]
  assert {row["n"] for row in first_round} == {4}  # every run, on the first 4 examples
  assert cut.cuts == [{"model": "vgg_tiny", "round": "2/3", "run": "0/3",
                       "next": "none unseen all"}]
  assert sorted(progress["batches"] for progress in finished.values()) == [1, 1, 1]
  # The same keys per batch: the rows of the first batch alone.
  assert first_round == grid(examples=dataset.take(4))

  lines = []
  assert grid(finished=finished, log=lines.append) == whole  # continues after round 1
  assert sum("kept from an earlier run (1/3 rounds, n=4)" in line for line in lines) == 3
  assert all(progress["batches"] == 3 for progress in finished.values())
