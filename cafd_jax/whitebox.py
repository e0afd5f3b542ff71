"""The white-box table: plain CAFD, HGD, adaptive CAFD and the adversarially trained classifier
(configs/whitebox.py), one row each, from the variants' report.json files.

    python -m cafd_jax.whitebox runs/whitebox/BASE [--out table.md]
"""

import os

from cafd_jax import io_utils, report

# (row label, variant workdir, defense); the undefended classifier's rows are the same model
# under every threat model, so its white-box cells read its unseen rows.
ROWS = (("no defense", "denoisers", "none"), ("CAFD", "denoisers", "cafd"),
        ("HGD", "denoisers", "hgd"), ("adaptive CAFD", "adaptive_cafd", "cafd"),
        ("PGD-AT classifier", "adversarial_classifier", "none"),
        ("adaptive CAFD, strong", "adaptive_cafd_strong", "cafd"),
        ("PGD-AT classifier, strong's compute", "adversarial_classifier_strong", "none"))
# (column, attack, threat model)
CELLS = (("clean", "none", "unseen"), ("PGD unseen", "pgd", "unseen"),
         ("AutoAttack unseen", "autoattack", "unseen"), ("PGD white-box", "pgd", "white_box"),
         ("AutoAttack white-box", "autoattack", "white_box"), ("PGD BPDA", "pgd", "bpda"),
         ("Square white-box", "square", "white_box"))
COLUMNS = ("defense",) + tuple(column for column, _, _ in CELLS) + ("train s",)
TRAIN_STAGES = {"denoisers": None, "adaptive_cafd": "train_denoiser",
                "adversarial_classifier": "train_classifier",
                "adaptive_cafd_strong": "train_denoiser",
                "adversarial_classifier_strong": "train_classifier"}


def _cell(results: list[dict], attack: str, defense: str, threat_model: str) -> str:
  """Accuracy in % with its 95% Wilson interval, or "-" where the grid has no such row."""
  row = report.find_row(results, attack, defense,
                        "unseen" if defense == "none" else threat_model)
  return report.percent_text(row) if row else "-"


def row_of(label: str, variant: str, defense: str, variant_report: dict) -> list[str]:
  seconds = variant_report.get("metadata", {}).get("stage_seconds", {})
  stage = TRAIN_STAGES[variant]
  train = f"{seconds[stage]:.0f}" if stage in seconds else "-"
  return [label] + [_cell(variant_report["results"], attack, defense, threat)
                    for _, attack, threat in CELLS] + [train]


def table(root: str) -> str:
  """Markdown table of every row whose variant under ``root`` has a report (accuracy in %)."""
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  reports = {}
  for variant in TRAIN_STAGES:
    path = os.path.join(root, variant, report.REPORT_JSON)
    if io_utils.path(path).exists():
      reports[variant] = io_utils.read_json(path)
  if not reports:
    raise SystemExit(f"error: no variant report under {root}; run launch/whitebox.sh first.")
  for label, variant, defense in ROWS:
    if variant in reports:
      lines.append("| " + " | ".join(row_of(label, variant, defense, reports[variant])) + " |")
  return "\n".join(lines)


def main() -> None:
  report.table_command(table, __doc__.splitlines()[0],
                       "runs/whitebox/BASE: one workdir per variant")


if __name__ == "__main__":
  main()
