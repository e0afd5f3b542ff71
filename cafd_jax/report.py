"""report.json and report.md from evaluation results, written atomically."""

import os
import platform
import sys
from typing import Sequence

import jax

from cafd_jax import integrity, io_utils


def _eps_text(eps) -> str:
  if eps is None:
    return "-"
  return f"{eps * 255:.3g}/255" if eps < 1 else f"{eps:.3g}"


def markdown_table(results: Sequence[dict]) -> str:
  """Accuracy table: a row per (attack, eps, threat model), a column per defense."""
  defenses = list(dict.fromkeys(row["defense"] for row in results))
  keys = list(dict.fromkeys((row["attack"], row.get("eps"), row["threat_model"])
                            for row in results))
  table = {(row["attack"], row.get("eps"), row["threat_model"], row["defense"]): row
           for row in results}
  lines = ["| attack | eps | threat model | " + " | ".join(defenses) + " |",
           "|---|---|---|" + "---|" * len(defenses)]
  for attack, eps, threat in keys:
    cells = []
    for defense in defenses:
      row = table.get((attack, eps, threat, defense))
      mark = " (bpda)" if row and row.get("gradient") == "bpda" else ""
      cells.append(f"{row['accuracy']:.4f}{mark}" if row else "-")
    eps_cell = _eps_text(eps) if attack != "none" else "-"
    lines.append(f"| {attack} | {eps_cell} | {threat} | " + " | ".join(cells) + " |")
  n = sorted({row["n"] for row in results})
  return "\n".join(lines) + f"\n\nAccuracy on n = {', '.join(map(str, n))} test images.\n"


def integrity_section(findings: Sequence[dict]) -> str:
  """The integrity checks, violations first."""
  if not findings:
    return "## Integrity checks\n\nNothing to compare in this grid.\n"
  ordered = sorted(findings, key=lambda f: f["status"] != "violated")
  lines = ["## Integrity checks", "",
           f"{sum(f['status'] == 'violated' for f in findings)} violated of {len(findings)}.", ""]
  lines += [f"- **{f['status'].upper()}** {f['check']}: {f['detail']}" for f in ordered]
  return "\n".join(lines) + "\n"


def metadata(seed: int, wall_time_s: float) -> dict:
  """Versions, devices, seed and wall time of the run that wrote the report."""
  import flax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  return {"python": sys.version.split()[0], "platform": platform.platform(),
          "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count(),
          "seed": seed, "wall_time_s": round(wall_time_s, 1)}


def write(workdir: str, config: dict, results: Sequence[dict], extra: dict | None = None) -> None:
  """Writes DIR/report.json and DIR/report.md (with integrity checks); never half-written."""
  findings = integrity.run_checks(results)
  report = {"config": config, "results": list(results), "integrity": findings}
  if extra:
    report.update(extra)
  io_utils.write_json(os.path.join(workdir, "report.json"), report)
  io_utils.write_text(os.path.join(workdir, "report.md"),
                      "# CAFD evaluation\n\n" + markdown_table(results) + "\n" +
                      integrity_section(findings))
