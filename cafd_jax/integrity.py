"""Sanity checks on an evaluation's result rows; a violation flags a weak attack or masking.

A row is a dict with at least ``attack``, ``defense``, ``threat_model``, ``model``, ``eps``
(None for minimal-norm attacks and ``none``) and ``accuracy``. Each check returns findings
``{"check", "status": "ok" | "violated", "detail"}``; a check with nothing to compare is omitted.
"""

from collections import defaultdict
from typing import Iterable

from cafd_jax.attacks import registry

GRADIENT_FREE = registry.SCORE_BASED
# AutoAttack counts as a gradient attack: its first stages are.
LINF_GRADIENT_ATTACKS = tuple(name for name, norm in registry.NORMS.items()
                              if norm == "linf" and name not in GRADIENT_FREE)
# Slack on accuracies: one example in a few hundred flips with float rounding or random starts.
TOLERANCE = 0.01
SQUARE_MARGIN = 0.05  # "a few points": Square beating every gradient attack by more is suspect


def _finding(check: str, violated: bool, detail: str) -> dict:
  return {"check": check, "status": "violated" if violated else "ok", "detail": detail}


def _key(row: dict, *fields: str) -> tuple:
  return tuple(row.get(field) for field in fields)


def accuracy_falls_with_eps(rows: list[dict], tolerance: float = TOLERANCE) -> list[dict]:
  """Per attack, defense, threat model and model: accuracy never rises as eps grows."""
  groups = defaultdict(list)
  for row in rows:
    if row.get("eps") is not None and row["attack"] != "none":
      groups[_key(row, "attack", "defense", "threat_model", "model")].append(row)
  findings = []
  for (attack, defense, threat, model), group in sorted(groups.items(), key=str):
    if len({r["eps"] for r in group}) < 2:
      continue
    curve = sorted((r["eps"], r["accuracy"]) for r in group)
    rises = [(a, b) for a, b in zip(curve, curve[1:]) if b[1] > a[1] + tolerance]
    detail = (f"{attack}/{defense}/{threat}/{model}: " +
              ", ".join(f"eps {e:.4g} -> {acc:.4f}" for e, acc in curve))
    findings.append(_finding("accuracy_falls_with_eps", bool(rises), detail))
  return findings


def white_box_not_above_unseen(rows: list[dict], tolerance: float = TOLERANCE) -> list[dict]:
  """An attacker who sees the defense does at least as well as one who does not."""
  unseen = {_key(r, "attack", "defense", "model", "eps"): r["accuracy"] for r in rows
            if r["threat_model"] == "unseen"}
  findings = []
  for row in rows:
    key = _key(row, "attack", "defense", "model", "eps")
    if row["threat_model"] != "white_box" or key not in unseen or row["attack"] == "none":
      continue
    violated = row["accuracy"] > unseen[key] + tolerance
    findings.append(_finding(
        "white_box_not_above_unseen", violated,
        f"{row['attack']}/{row['defense']}/{row['model']}: white-box {row['accuracy']:.4f}, "
        f"unseen {unseen[key]:.4f}"))
  return findings


def square_not_stronger_than_gradients(rows: list[dict],
                                       margin: float = SQUARE_MARGIN) -> list[dict]:
  """Gradient-free Square beating every gradient attack by > margin suggests masked gradients.

  Square under ``white_box`` is held against the white-box and the BPDA gradient attacks of the
  same defense (a score-based attack has no gradient for BPDA to replace, so it runs once)."""
  gradient = defaultdict(list)
  square = {}
  fields = ("defense", "threat_model", "model", "eps")
  for row in rows:
    key = _key(row, *fields)
    if row["attack"] in GRADIENT_FREE:
      square[key] = row["accuracy"]
    elif row["attack"] in LINF_GRADIENT_ATTACKS:
      label = row["attack"]
      if row["threat_model"] == "bpda":  # a gradient attack on the white-box model too
        label = f"{label} (bpda)"
        gradient[_key(dict(row, threat_model="white_box"), *fields)].append(
            (row["accuracy"], label))
      gradient[key].append((row["accuracy"], label))
  findings = []
  for key, square_accuracy in sorted(square.items(), key=str):
    if not gradient.get(key):
      continue
    best, best_attack = min(gradient[key])
    defense, threat, model, eps = key
    findings.append(_finding(
        "square_not_stronger_than_gradients", square_accuracy < best - margin,
        f"{defense}/{threat}/{model} eps {eps}: square {square_accuracy:.4f}, best gradient "
        f"attack {best_attack} {best:.4f}"))
  return findings


def zero_eps_matches_clean(rows: list[dict], tolerance: float = TOLERANCE) -> list[dict]:
  """An attack with budget 0 leaves clean accuracy unchanged."""
  clean = {_key(r, "defense", "threat_model", "model"): r["accuracy"] for r in rows
           if r["attack"] == "none"}
  findings = []
  for row in rows:
    key = _key(row, "defense", "threat_model", "model")
    if row["attack"] == "none" or row.get("eps") != 0 or key not in clean:
      continue
    findings.append(_finding(
        "zero_eps_matches_clean", abs(row["accuracy"] - clean[key]) > tolerance,
        f"{row['attack']}/{row['defense']}/{row['threat_model']}/{row['model']}: eps 0 "
        f"{row['accuracy']:.4f}, clean {clean[key]:.4f}"))
  return findings


CHECKS = (accuracy_falls_with_eps, white_box_not_above_unseen, square_not_stronger_than_gradients,
          zero_eps_matches_clean)


def run_checks(rows: Iterable[dict]) -> list[dict]:
  """All checks' findings, in a stable order."""
  rows = list(rows)
  return [finding for check in CHECKS for finding in check(rows)]
