"""The ablation table: one row per variant workdir (configs/ablations.py), from report.json.

    python -m cafd_jax.ablations runs/ablations/BASE [--out table.md]
"""

import argparse
import os
from typing import Callable, Sequence

from cafd_jax import io_utils
from configs import ablations

COLUMNS = ("variant", "denoiser", "clean", "PGD unseen", "PGD white-box", "no defense: PGD",
           "denoiser train s", "evaluate s")


def _accuracy(results: list[dict], attack: str, defense: str, threat_model: str) -> str:
  found = [row["accuracy"] for row in results if (row["attack"], row["defense"],
                                                 row["threat_model"]) == (attack, defense,
                                                                          threat_model)]
  return f"{100 * found[0]:.1f}" if found else "-"


def row_of(variant: str, report: dict) -> list[str]:
  """One table row from a variant's report.json."""
  results = report["results"]
  defense = next(row["defense"] for row in results if row["defense"] != "none")
  seconds = report.get("metadata", {}).get("stage_seconds", {})
  train_seconds = seconds.get("train_denoiser", seconds.get("train_baselines"))
  return [variant, defense, _accuracy(results, "none", defense, "unseen"),
          _accuracy(results, "pgd", defense, "unseen"),
          _accuracy(results, "pgd", defense, "white_box"),
          _accuracy(results, "pgd", "none", "unseen"),
          f"{train_seconds:.0f}" if train_seconds is not None else "-",
          f"{seconds['evaluate']:.0f}" if "evaluate" in seconds else "-"]


def table(root: str) -> str:
  """Markdown table of every variant under ``root`` that has a report (accuracy in %)."""
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  found = 0
  for variant in ablations.VARIANTS:
    path = os.path.join(root, variant, "report.json")
    if io_utils.path(path).exists():
      lines.append("| " + " | ".join(row_of(variant, io_utils.read_json(path))) + " |")
      found += 1
  if not found:
    raise SystemExit(f"error: no {ablations.VARIANTS[0]}/report.json (or other variant) under "
                     f"{root}; run launch/ablations.sh first.")
  return "\n".join(lines)


def table_command(table_fn: Callable[[str], str], description: str, root_help: str,
                  argv: Sequence[str] | None = None) -> None:
  """``python -m MODULE ROOT [--out FILE]``: prints ``table_fn(ROOT)``, also into FILE."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("root", help=root_help)
  parser.add_argument("--out", default="", help="also write the table to this file")
  args = parser.parse_args(argv)
  text = table_fn(args.root)
  print(text)
  if args.out:
    io_utils.write_text(args.out, text + "\n")


def main() -> None:
  table_command(table, __doc__.splitlines()[0], "runs/ablations/BASE: one workdir per variant")


if __name__ == "__main__":
  main()
