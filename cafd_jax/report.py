"""report.json and report.md from evaluation results, written atomically."""

import os
from typing import Sequence

from cafd_jax import io_utils


def markdown_table(results: Sequence[dict]) -> str:
  """Accuracy table: one row per attack (and threat model), one column per defense."""
  defenses = list(dict.fromkeys(row["defense"] for row in results))
  rows = list(dict.fromkeys((row["attack"], row["threat_model"]) for row in results))
  accuracy = {(row["attack"], row["threat_model"], row["defense"]): row for row in results}
  lines = ["| attack | threat model | " + " | ".join(defenses) + " |",
           "|---|---|" + "---|" * len(defenses)]
  for attack, threat in rows:
    cells = []
    for defense in defenses:
      row = accuracy.get((attack, threat, defense))
      cells.append(f"{row['accuracy']:.4f}" if row else "-")
    lines.append(f"| {attack} | {threat} | " + " | ".join(cells) + " |")
  n = sorted({row["n"] for row in results})
  return "\n".join(lines) + f"\n\nAccuracy on n = {', '.join(map(str, n))} test images.\n"


def write(workdir: str, config: dict, results: Sequence[dict], extra: dict | None = None) -> None:
  """Writes DIR/report.json and DIR/report.md; neither is ever half-written."""
  report = {"config": config, "results": list(results)}
  if extra:
    report.update(extra)
  io_utils.write_json(os.path.join(workdir, "report.json"), report)
  io_utils.write_text(os.path.join(workdir, "report.md"),
                      "# CAFD evaluation\n\n" + markdown_table(results))
