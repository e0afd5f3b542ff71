"""report.json, report.md and figures from evaluation results, written atomically.

``write`` stores the results in DIR/report.json and calls ``render``, which draws everything
else (report.md, DIR/figures/*.png) from the workdir's files alone, so
``--config.stages=report`` rebuilds the same outputs without recomputing anything.

    python -m cafd_jax.report DIR [--out table.md]

prints DIR's accuracy table in % with each cell's 95% Wilson interval.
"""

import argparse
import io
import math
import os
import platform
import sys
from typing import Callable, Sequence

import jax
import numpy as np

from cafd_jax import figures, integrity, io_utils

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
FIGURES_DIR = "figures"


class ReportError(ValueError):
  """report.json is missing or unreadable; the message says what to run."""


def _eps_text(eps) -> str:
  if eps is None:
    return "-"
  return f"{eps * 255:.3g}/255" if eps < 1 else f"{eps:.3g}"


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
  """The 95% (``z`` = 1.96) Wilson score interval of an accuracy measured on ``n`` examples."""
  if n <= 0:
    return 0.0, 1.0
  centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
  half = z / (1 + z * z / n) * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
  return max(0.0, centre - half), min(1.0, centre + half)


def find_row(results: Sequence[dict], attack: str, defense: str, threat_model: str,
             eps: float | None = None) -> dict | None:
  """The first result of the run's own target (not a transfer target, ``NAME@WORKDIR``) for
  that attack, defense, threat model and, when given, eps; None if the grid has none."""
  for row in results:
    if ("@" not in str(row.get("model", ""))
        and (row["attack"], row["defense"], row["threat_model"]) == (attack, defense, threat_model)
        and (eps is None or math.isclose(row.get("eps") or 0.0, eps, abs_tol=1e-9))):
      return row
  return None


def percent_text(row: dict, interval: bool = True) -> str:
  """A result's accuracy in %, with its 95% Wilson interval: "81.6 (79.8-83.3)"."""
  if not interval:
    return f"{100 * row['accuracy']:.1f}"
  low, high = wilson_interval(row["accuracy"], row["n"])
  return f"{100 * row['accuracy']:.1f} ({100 * low:.1f}-{100 * high:.1f})"


def markdown_table(results: Sequence[dict], intervals: bool = False) -> str:
  """Accuracy table: a row per (model, attack, eps, threat model), a column per defense; with
  ``intervals``, each cell in % with its 95% Wilson interval.

  The model column appears only when the rows name more than one target model.
  """
  defenses = list(dict.fromkeys(row["defense"] for row in results))
  cell = lambda row: (row.get("model"), row["attack"], row.get("eps"), row["threat_model"])
  keys = list(dict.fromkeys(cell(row) for row in results))
  table = {(*cell(row), row["defense"]): row for row in results}
  with_model = len({key[0] for key in keys}) > 1
  head = "| model " if with_model else ""
  lines = [head + "| attack | eps | threat model | " + " | ".join(defenses) + " |",
           ("|---" if with_model else "") + "|---|---|---|" + "---|" * len(defenses)]
  for model, attack, eps, threat in keys:
    cells = []
    for defense in defenses:
      row = table.get((model, attack, eps, threat, defense))
      if row is None:
        cells.append("-")
        continue
      mark = " (bpda)" if row.get("gradient") == "bpda" else ""
      cells.append((percent_text(row) if intervals else f"{row['accuracy']:.4f}") + mark)
    eps_cell = _eps_text(eps) if attack != "none" else "-"
    lead = f"| {model} " if with_model else ""
    lines.append(f"{lead}| {attack} | {eps_cell} | {threat} | " + " | ".join(cells) + " |")
  n = sorted({row["n"] for row in results})
  if intervals:
    return ("\n".join(lines) + f"\n\nAccuracy in % on n = {', '.join(map(str, n))} test "
            f"images, with its 95% Wilson interval.\n")
  widest = max((interval[1] - interval[0]) / 2 for interval in
               (wilson_interval(row["accuracy"], row["n"]) for row in results))
  return ("\n".join(lines) + f"\n\nAccuracy on n = {', '.join(map(str, n))} test images; "
          f"each accuracy's 95% Wilson interval is within ±{100 * widest:.1f} points.\n")


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
  """Versions, devices, XLA flags, seed and wall time of the run that wrote the report."""
  import flax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  return {"python": sys.version.split()[0], "platform": platform.platform(),
          "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "seed": seed, "wall_time_s": round(wall_time_s, 1)}


def write(workdir: str, config: dict, results: Sequence[dict], extra: dict | None = None,
          draw_figures: bool = True) -> None:
  """Writes DIR/report.json (results + integrity checks), then ``render``s the rest (the
  figures only with ``draw_figures``)."""
  findings = integrity.run_checks(results)
  report = {"config": config, "results": list(results), "integrity": findings}
  if extra:
    report.update(extra)
  io_utils.write_json(os.path.join(workdir, REPORT_JSON), report)
  render(workdir, draw_figures)


def load(workdir: str) -> dict:
  """DIR/report.json, or a one-line ReportError saying how to produce it."""
  path = os.path.join(workdir, REPORT_JSON)
  if not io_utils.path(path).exists():
    raise ReportError(f"{path} does not exist; run the evaluate stage first with this --workdir.")
  try:
    report = io_utils.read_json(path)
    report["results"]  # pylint: disable=pointless-statement
  except (ValueError, KeyError, TypeError) as error:
    raise ReportError(f"{path} is not a readable report ({type(error).__name__}); rerun the "
                      f"evaluate stage to rewrite it.") from None
  return report


def figures_section(written: Sequence[str]) -> str:
  if not written:
    return ""
  return "## Figures\n\n" + "\n".join(f"![{name}]({FIGURES_DIR}/{name})" for name in written) + "\n"


def write_figures(workdir: str, results: Sequence[dict]) -> list[str]:
  """The PNGs under DIR/figures/ that the workdir's files allow; returns their names."""
  directory = os.path.join(workdir, FIGURES_DIR)
  io_utils.path(directory).mkdir(parents=True, exist_ok=True)
  written = []
  if figures.accuracy_vs_eps(results, os.path.join(directory, figures.ACCURACY_VS_EPS)):
    written.append(figures.ACCURACY_VS_EPS)
  arrays_path = os.path.join(directory, figures.CAM_ARRAYS)
  if io_utils.path(arrays_path).exists():
    with np.load(io.BytesIO(io_utils.path(arrays_path).read_bytes()), allow_pickle=False) as arrays:
      figures.cam_grid(dict(arrays), os.path.join(directory, figures.CAM_GRID))
    written.append(figures.CAM_GRID)
  if figures.training_curves(os.path.join(workdir, "tensorboard"),
                             os.path.join(directory, figures.TRAINING_CURVES)):
    written.append(figures.TRAINING_CURVES)
  return written


def render(workdir: str, draw_figures: bool = True) -> None:
  """report.md and figures from DIR/report.json (and the arrays and logs beside it); without
  ``draw_figures``, report.md alone."""
  report = load(workdir)
  results = report["results"]
  findings = report.get("integrity")
  if findings is None:
    findings = integrity.run_checks(results)
  written = write_figures(workdir, results) if draw_figures else []
  io_utils.write_text(os.path.join(workdir, REPORT_MD),
                      "# CAFD evaluation\n\n" + markdown_table(results) + "\n" +
                      integrity_section(findings) + "\n" + figures_section(written))


def table_command(table_fn: Callable[[str], str], description: str, root_help: str,
                  argv: Sequence[str] | None = None) -> None:
  """``python -m MODULE ROOT [--out FILE]``: prints ``table_fn(ROOT)``, also into FILE; a
  ReportError ends in its one line."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("root", help=root_help)
  parser.add_argument("--out", default="", help="also write the table to this file")
  args = parser.parse_args(argv)
  try:
    text = table_fn(args.root)
  except ReportError as error:
    raise SystemExit(f"error: {error}") from None
  print(text)
  if args.out:
    io_utils.write_text(args.out, text + "\n")


def main(argv: Sequence[str] | None = None) -> None:
  table_command(lambda workdir: markdown_table(load(workdir)["results"], intervals=True),
                "A workdir's accuracy table in % with 95% Wilson intervals.",
                "a workdir with report.json", argv)


if __name__ == "__main__":
  main()
