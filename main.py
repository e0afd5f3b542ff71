"""Runs the CAFD pipeline: python main.py --config configs/X.py --workdir DIR."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cafd_jax import checkpoint, config_checks, data, pipeline, report

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.ERROR)  # Orbax is chatty at INFO and WARNING
  try:
    pipeline.run(_CONFIG.value, _WORKDIR.value)
  except (config_checks.ConfigError, data.DataError, checkpoint.CheckpointError,
          report.ReportError) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
