"""The command line: ``python main.py --config configs/X.py --workdir DIR``, or the ``cafd-jax``
command that ``pip install .`` puts on the PATH (same flags)."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cafd_jax import checkpoint, config_checks, data, pipeline, report
from cafd_jax import workdir as workdir_guard
from cafd_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors that end a run with one line on stderr and this exit code: 2 for what the user
# gave (config, data, workdir, missing or mismatched checkpoints), 1 for what went wrong
# while running (non-finite training, a failed write), 130 for Ctrl-C.
_USER_ERRORS = (config_checks.ConfigError, data.DataError, checkpoint.CheckpointError,
                report.ReportError, workdir_guard.WorkdirError)
_RUN_ERRORS = (loop.NonFiniteError, OSError)


def _run(config, workdir: str) -> int:
  """Runs the pipeline; the exit code, after one line on stderr if it failed."""
  try:
    pipeline.run(config, workdir)
  except _USER_ERRORS as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  except _RUN_ERRORS as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("interrupted; the same command resumes from the last checkpoint", file=sys.stderr)
    return 130
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.ERROR)  # Orbax is chatty at INFO and WARNING
  sys.exit(_run(_CONFIG.value, _WORKDIR.value))


def run() -> None:
  """Entry point of ``main.py`` and of the ``cafd-jax`` console command."""
  app.run(main)


if __name__ == "__main__":
  run()
