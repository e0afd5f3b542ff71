"""XLA:CPU flags this project sets before JAX starts its backends (``import cafd_jax`` does).

XLA:CPU (jaxlib 0.10) hands 2D float convolutions to its YNNPACK library. On this project's
2-core CPU that library ran the 32x32 convolutions of these models at about half the speed of
XLA's own convolutions (32x32, 64 -> 64 channels, batch 128: 223 ms against 111 ms forward;
3 -> 64: 47 against 27 ms) and was no faster on smaller maps (16x16 and 8x8: within 10%), so
``apply()`` turns YNNPACK off for convolutions only (matrix products, reductions and
element-wise work keep it): ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``.
docs/benchmarks.md has the steps measured with and without it.

The flag is experimental and its ``-`` syntax new, and an XLA that does not know a flag in
``XLA_FLAGS`` aborts, so it is added only for the jaxlib minor version it was measured with.
A flag a user already put in ``XLA_FLAGS`` wins (e.g.
``--xla_cpu_experimental_ynn_fusion_type=+individual_convolution`` gives XLA's default back).
GPU and TPU backends ignore it. It does nothing once JAX's backends have started (XLA reads
``XLA_FLAGS`` once): import cafd_jax before running JAX computations.
"""

import os
import re

FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "-individual_convolution"}
MEASURED_JAXLIB = (0, 10)  # major, minor


def _major_minor(version: str) -> tuple[int, ...]:
  match = re.match(r"(\d+)\.(\d+)", version)
  return (int(match.group(1)), int(match.group(2))) if match else ()


def flags_to_add(xla_flags: str, jaxlib_version: str) -> list[str]:
  """The ``FLAGS`` that ``xla_flags`` does not set already, for the jaxlib they were measured
  with; none for any other jaxlib."""
  if _major_minor(jaxlib_version) != MEASURED_JAXLIB:
    return []
  present = {token.split("=", 1)[0].lstrip("-") for token in xla_flags.split()}
  return [f"--{name}={value}" for name, value in FLAGS.items() if name not in present]


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # a JAX without this helper: assume not started
    return False


def apply() -> list[str]:
  """Appends ``flags_to_add`` to ``XLA_FLAGS`` unless JAX's backends have started; returns the
  flags it added."""
  import jaxlib  # pylint: disable=g-import-not-at-top
  if _backends_started():
    return []
  current = os.environ.get("XLA_FLAGS", "")
  added = flags_to_add(current, getattr(jaxlib, "__version__", ""))
  if added:
    os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added
