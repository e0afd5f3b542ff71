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
