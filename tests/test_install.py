"""The package installs like one: `pip install .` into a fresh virtual environment gives a working
`cafd-jax` command and `import cafd_jax` from any folder, with configs still given by path."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

_PACKAGE_FILES = ("cafd_jax", "configs", "pyproject.toml", "requirements.txt", "README.md",
                  "LICENSE")


@pytest.mark.slow  # a virtual environment, an install and a tiny pipeline (~2 min on 2 cores)
def test_pip_install_gives_a_cafd_jax_command_that_runs_from_another_folder(tmp_path):
  source = tmp_path / "source"  # a copy: building writes egg-info beside the sources
  for name in _PACKAGE_FILES:
    copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
    copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                        if (ROOT / name).is_dir() else {}))
  venv = tmp_path / "venv"
  # The dependencies come from this interpreter's site-packages; the package itself, its console
  # command and its configs from the install (its build backend, setuptools, from pip's index).
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
  install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(source)],
                           capture_output=True, text=True, timeout=600)
  assert install.returncode == 0, install.stderr[-3000:]
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
  where = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import cafd_jax, configs.base; print(cafd_jax.__file__)"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
  assert where.returncode == 0, where.stderr[-3000:]
  assert str(venv) in where.stdout and str(ROOT) not in where.stdout
  workdir = elsewhere / "run"
  run = subprocess.run([str(venv / "bin" / "cafd-jax"), "--config",
                        str(ROOT / "configs" / "tiny.py"), "--workdir", str(workdir)],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "[pipeline] done" in run.stdout
  assert (workdir / "report.json").exists() and (workdir / "report.md").exists()
