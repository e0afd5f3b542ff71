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
