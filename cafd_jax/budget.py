"""Stage time budgets: ``config.max_seconds.<stage>`` seconds from the stage's start.

A budget counts wall time from the moment its stage starts, compilation included; 0 means no
limit. Each stage checks it at its own boundaries and stops cleanly once it is spent:

* training stages (classifier, denoiser, baselines): at the first step boundary past the
  budget, after writing a checkpoint there, so the same command with a larger budget resumes;
* ``craft``: before the next chunk (the chunks done are kept; the denoisers train on them);
* ``evaluate``: before the next batch of an attack run; the grid goes round by round of
  batches (every run's first batch, then every run's second, ...), so a cut report holds every
  run, on the first rounds' examples.

With ``config.fit_epochs_to_budget``, a training stage that its budget would cut times its
first steps and trains fewer whole epochs instead (``epochs_within``), so that its learning-rate
schedule runs to its end; the plan is kept beside the checkpoints and recorded (``Budget.fit``).

Where a stage was cut is recorded (``Budget.cut``) and lands, per stage, in DIR/stages.json
and the metadata of report.json. Several processes agree on every decision (process 0's
clock decides), so they stop at the same step.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from cafd_jax import io_utils

STAGES = ("train_classifier", "craft", "train_denoiser", "train_baselines", "evaluate")
STAGES_FILE = "stages.json"


class Budget:
  """The time budget of one stage (``max_seconds`` <= 0: unlimited) and where it cut the stage."""

  def __init__(self, max_seconds: float = 0.0, *, clock: Callable[[], float] = time.perf_counter,
               start: float | None = None):
    self.max_seconds = float(max_seconds or 0.0)
    self._clock = clock
    self.start = clock() if start is None else start
    self.cuts: list[dict[str, Any]] = []
    self.fits: list[dict[str, Any]] = []

  @property
  def limited(self) -> bool:
    return self.max_seconds > 0

  def elapsed(self) -> float:
    return self._clock() - self.start

  def remaining(self) -> float:
    """Seconds left (inf when unlimited, never below 0)."""
    return max(self.max_seconds - self.elapsed(), 0.0) if self.limited else float("inf")

  def spent(self) -> bool:
    """Whether the budget is used up; the same answer on every process (process 0's clock)."""
    if not self.limited:
      return False
    return bool(agreed(self.elapsed() >= self.max_seconds))

  def share(self, parts: int) -> Budget:
    """A budget of an equal share of what is left, for the first of ``parts`` sub-tasks run one
    after another (e.g. each baseline denoiser); its cuts are recorded here too."""
    if not self.limited:
      return self
    # A spent budget shares out a spent one (not 0 seconds, which would mean no limit).
    child = Budget(max(self.remaining() / max(parts, 1), 1e-9), clock=self._clock)
    child.cuts, child.fits = self.cuts, self.fits
    return child

  def cut(self, **where: Any) -> None:
    """Records that the stage stopped early, and where (epoch, step, chunk, run, ...)."""
    self.cuts.append(dict(where))

  def fit(self, **what: Any) -> None:
    """Records that a training run was shortened to fit the budget (stage, epochs)."""
    self.fits.append(dict(what))

  def record(self) -> dict[str, Any]:
    """The stage's entry of DIR/stages.json."""
    record = {"max_seconds": self.max_seconds, "seconds": round(self.elapsed(), 1),
              "cut": bool(self.cuts), "cut_at": list(self.cuts)}
    if self.fits:
      record["fitted"] = list(self.fits)
    return record


def agreed(value: int) -> int:
  """``value`` as process 0 has it, on every process (one process: itself)."""
  if jax.process_count() == 1:
    return int(value)
  return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))


def epochs_within(seconds: float, step_seconds: float, steps_per_epoch: int, planned: int,
                  margin: float = 0.05) -> int:
  """The whole epochs, from 1 to ``planned``, whose steps of ``step_seconds`` each fit in
  ``seconds`` less a ``margin`` fraction (checkpoints, the stage's own end)."""
  epoch_seconds = max(step_seconds, 1e-9) * steps_per_epoch
  return int(min(max(seconds * (1.0 - margin) // epoch_seconds, 1), planned))


def describe(record: dict[str, Any]) -> str:
  """'budget 60s; cut at chunk 3/20' or 'no budget', for the stage's summary line."""
  text = f"budget {record['max_seconds']:g}s" if record["max_seconds"] > 0 else "no budget"
  for fitted in record.get("fitted", ()):
    text += f"; {fitted['stage']} fitted to {fitted['epochs']} epochs"
  if record["cut"]:
    places = [", ".join(f"{key} {value}" for key, value in where.items())
              for where in record["cut_at"]]
    text += "; cut at " + "; ".join(places)
  return text


def stage_seconds(config: Any, stage: str) -> float:
  """``config.max_seconds.<stage>`` (0 when the config has no such field: unlimited)."""
  budgets = config.get("max_seconds", None)
  return float(budgets.get(stage, 0.0)) if budgets is not None else 0.0


def read_records(workdir: str) -> dict[str, dict]:
  """DIR/stages.json: the latest record of each stage run in this workdir ({} if none)."""
  try:
    records = io_utils.read_json(os.path.join(workdir, STAGES_FILE), missing={})
  except ValueError:
    return {}  # rewritten whole at the next stage's end
  return records if isinstance(records, dict) else {}


def write_record(workdir: str, stage: str, record: dict[str, Any]) -> None:
  """Stores ``record`` as ``stage``'s entry of DIR/stages.json (atomically, others kept)."""
  records = read_records(workdir)
  records[stage] = record
  ordered = {name: records[name] for name in STAGES if name in records}
  ordered.update((name, value) for name, value in records.items() if name not in ordered)
  io_utils.write_json(os.path.join(workdir, STAGES_FILE), ordered)
