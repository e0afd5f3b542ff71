"""Runs the CAFD pipeline: python main.py --config configs/X.py --workdir DIR (the installed
``cafd-jax`` command is the same; flags and exit codes in cafd_jax/cli.py)."""

from cafd_jax import cli

if __name__ == "__main__":
  cli.run()
