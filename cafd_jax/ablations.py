"""The ablation table: one row per variant workdir (configs/ablations.py), from report.json.

    python -m cafd_jax.ablations runs/ablations/BASE [--out table.md]
"""

import os

from cafd_jax import io_utils, report
from configs import ablations

COLUMNS = ("variant", "denoiser", "clean", "PGD unseen", "PGD white-box", "no defense: PGD",
           "denoiser train s", "evaluate s")


def _accuracy(results: list[dict], attack: str, defense: str, threat_model: str) -> str:
  row = report.find_row(results, attack, defense, threat_model)
  return report.percent_text(row, interval=False) if row else "-"


def row_of(variant: str, variant_report: dict) -> list[str]:
  """One table row from a variant's report.json."""
  results = variant_report["results"]
  defense = next(row["defense"] for row in results if row["defense"] != "none")
  seconds = variant_report.get("metadata", {}).get("stage_seconds", {})
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


def main() -> None:
  report.table_command(table, __doc__.splitlines()[0],
                       "runs/ablations/BASE: one workdir per variant")


if __name__ == "__main__":
  main()
