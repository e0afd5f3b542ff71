"""Shared fixtures: the repository root on sys.path, tiny configs, a trained tiny classifier."""

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"
sys.path.insert(0, str(ROOT))


def write_executable(path: Path, text: str) -> Path:
  """A script at ``path`` that the shell can run (stand-ins for python, srun, gcloud)."""
  path.write_text(text)
  path.chmod(0o755)
  return path


def assert_in_box(x, low: float = 0.0, high: float = 1.0, atol: float = 0.0) -> None:
  """x is finite and within [low - atol, high + atol], read in numpy.

  XLA:CPU's min/max reductions over large arrays may skip NaN (seen on jax 0.10.2, where
  ``jnp.min`` of a [8, 32, 32, 3] array with a NaN image returned a number); numpy's do not.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  x = np.asarray(x)
  assert np.all(np.isfinite(x)), f"{np.sum(~np.isfinite(x))} non-finite values"
  assert x.min() >= low - atol and x.max() <= high + atol, (x.min(), x.max())


def pytest_configure(config):
  """One XLA compilation cache for the session, shared with the main.py subprocesses.

  The end-to-end tests start main.py many times on the same tiny config; compiling its train,
  craft and attack steps dominated their time. The cache starts empty in a fresh temporary
  folder (set before any test imports jax) and is removed at the end, so nothing carries over
  between sessions. A JAX_COMPILATION_CACHE_DIR set by the caller is used instead.
  """
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    config.cafd_xla_cache = tempfile.mkdtemp(prefix="cafd-jax-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = config.cafd_xla_cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_unconfigure(config):
  if getattr(config, "cafd_xla_cache", None):
    shutil.rmtree(config.cafd_xla_cache, ignore_errors=True)


def run_main(workdir, *overrides, config: str = "configs/tiny.py", timeout: int = 600):
  """``python main.py --config CONFIG --workdir WORKDIR OVERRIDES...`` from the repository root."""
  command = [sys.executable, "main.py", "--config", config, "--workdir", str(workdir), *overrides]
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
  """(workdir, result) of the whole tiny pipeline, run once for every test that reads it."""
  workdir = tmp_path_factory.mktemp("run") / "work"
  result = run_main(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


@pytest.fixture()
def tiny_config():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  return tiny.get_config()


@pytest.fixture(scope="session")
def trained_tiny():
  """A small VGG trained for a few seconds on synthetic shapes: (model, variables, test set)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np
  from cafd_jax import data, models
  from cafd_jax.train import classifier, common, loop

  train_set = data.make_synthetic(1200, seed=1)
  test_set = data.make_synthetic(200, seed=2)
  model = models.create_classifier("vgg_tiny", num_classes=10, width=0.5,
                                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
  tx = common.make_optimizer("adam", 2e-3, weight_decay=0.0)
  state = common.create_state(model, jax.random.key(0), train_set.images[:1], tx)
  step = classifier.make_step_fn(use_augmentation=False)
  for epoch in range(4):
    order = loop.epoch_order(len(train_set), 0, epoch)
    for start in range(0, len(order) - 49, 50):
      batch = order[start:start + 50]
      state, _ = step(state, (train_set.images[batch], train_set.labels[batch]), jax.random.key(epoch))
  variables = common.variables_of(state)
  logits = model.apply(variables, test_set.images)
  accuracy = float(np.mean(np.argmax(logits, -1) == test_set.labels))
  return model, variables, test_set, accuracy


def correct_predictions(model, x, y):
  """Per example, whether ``model = (apply_fn, params)`` classifies x correctly (numpy bool)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  apply_fn, params = model
  return np.asarray(_jitted_predict(apply_fn)(params, x)) == np.asarray(y)


@functools.lru_cache(maxsize=None)
def _jitted_predict(apply_fn):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jax.jit(lambda params, x: jnp.argmax(apply_fn(params, x), -1))
