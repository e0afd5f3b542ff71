"""Progress lines on the terminal and scalars to TensorBoard event files."""

import os
import time
from typing import Mapping

import jax
import numpy as np

from cafd_jax import io_utils


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _BucketEventFiles:
  """tensorboardX writer factory for a bucket workdir: event files through ``etils.epath``, as
  every other workdir file (an object appears when its stage's writer closes)."""

  def open(self, location: str):
    return io_utils.path(location).open("wb")

  def directory_check(self, location: str) -> None:
    io_utils.path(location).mkdir(parents=True, exist_ok=True)


def _summary_writer(log_dir: str):
  from tensorboardX import SummaryWriter, record_writer  # pylint: disable=g-import-not-at-top
  if not io_utils.is_local(log_dir):
    record_writer.register_writer_factory(log_dir.split("://")[0], _BucketEventFiles())
  return SummaryWriter(log_dir)


class ProgressLogger:
  """Prints ``[stage] step s/total  loss ...  img/s  ETA`` and writes TensorBoard scalars."""

  def __init__(self, stage: str, total_steps: int, workdir: str | None, batch_size: int,
               every_steps: int = 50):
    self.stage, self.total_steps, self.batch_size = stage, total_steps, batch_size
    self.every_steps = max(1, every_steps)
    self._writer = None
    if workdir and jax.process_index() == 0:
      self._writer = _summary_writer(os.path.join(workdir, "tensorboard", stage))
    self._last_time, self._last_step = time.perf_counter(), None

  def step(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
    """Call after each train step (``step`` counts from 1); logs every ``every_steps``. The
    rate counts from the end of the first step of this run, so compilation is not in it."""
    if step % self.every_steps and step != self.total_steps:
      if self._last_step is None:  # the first step: the rate starts when it is done
        jax.block_until_ready(metrics)
        self._last_time, self._last_step = time.perf_counter(), step
      return
    values = {name: float(np.asarray(value)) for name, value in metrics.items()}
    now = time.perf_counter()
    if self._last_step is None:  # first call after start or resume: includes compilation
      rate = 0.0
    else:
      rate = (step - self._last_step) * self.batch_size / max(now - self._last_time, 1e-9)
    eta = (self.total_steps - step) * self.batch_size / rate if rate else float("nan")
    self._last_time, self._last_step = now, step
    shown = "  ".join(f"{name} {value:.4g}" for name, value in values.items())
    eta_text = _format_seconds(eta) if rate else "?"
    if jax.process_index() == 0:
      print(f"[{self.stage}] step {step}/{self.total_steps}  {shown}  {rate:.0f} img/s  "
            f"ETA {eta_text}", flush=True)
    self.scalars(step, values)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._writer is not None:
      for name, value in values.items():
        self._writer.add_scalar(f"{self.stage}/{name}", float(value), step)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
