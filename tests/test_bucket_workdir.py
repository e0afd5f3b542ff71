"""A workdir in a bucket (``gs://``): every read and write goes through etils.epath and Orbax.

No network here, so ``gs://`` is served by a stand-in: an fsspec file system registered for the
``gs`` scheme (what etils.epath uses for ``gs://`` without TensorFlow) and TensorStore's kvstore
for Orbax's arrays, both over one folder outside the working directory. TensorStore does not
go through fsspec, so its GCS spec is pointed at that folder's files; Orbax otherwise takes its
GCS code paths (commit_success.txt markers instead of renames). The working directory stays
empty: a write that bypassed the abstraction would land there, as a folder named ``gs:``.
"""

import importlib
import os
import shutil

from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
import jax.numpy as jnp
import numpy as np
from orbax.checkpoint._src.path import gcs_utils
import pytest

from cafd_jax import api, io_utils, pipeline
from cafd_jax import workdir as workdir_guard

WORKDIR = "gs://bucket/run"
FSSPEC_REGISTRY = importlib.import_module("fsspec.registry")  # fsspec.registry is a view


@pytest.fixture()
def bucket(tmp_path, monkeypatch):
  """The folder behind ``gs://``; the test runs in an empty working directory."""
  root = tmp_path / "bucket_store"
  root.mkdir()

  class FakeBucket(DirFileSystem):
    protocol = ("gs", "gcs")
    cachable = False

    def __init__(self, *args, **kwargs):
      del args, kwargs  # gcsfs's options (finalize_on_close, ...)
      super().__init__(path=str(root), fs=LocalFileSystem())

    @classmethod
    def _strip_protocol(cls, path):
      path = os.fspath(path)
      for prefix in ("gs://", "gcs://"):
        path = path.removeprefix(prefix)
      return path.rstrip("/")

  def kvstore(path):
    bucket_name, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
    return {"driver": "file", "path": str(root / bucket_name / key)}

  monkeypatch.setenv("EPATH_USE_TF", "false")
  for scheme in FakeBucket.protocol:
    monkeypatch.setitem(FSSPEC_REGISTRY._registry, scheme, FakeBucket)  # pylint: disable=protected-access
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  monkeypatch.setitem(workdir_guard.BUCKET_PACKAGES, "gs", ())  # the stand-in replaces gcsfs
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  working = tmp_path / "cwd"
  working.mkdir()
  monkeypatch.chdir(working)
  yield root
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  assert not os.listdir(working), "files written outside the path abstraction"


def test_whole_tiny_pipeline_in_a_bucket_then_api_load(bucket, tiny_config):
  config = tiny_config
  config.eval.attacks = "none,pgd"
  config.eval.defenses = "none,cafd"
  pipeline.run(config, WORKDIR)

  stored = bucket / "bucket" / "run"
  for name in ("config.json", "classes.json", "report.json", "report.md", "stages.json",
               "eval_runs.json"):
    assert (stored / name).is_file(), name
  assert list((stored / pipeline.CRAFT_DIR).glob("chunk_*.npy"))
  assert list((stored / "tensorboard").rglob("events.out.tfevents.*"))
  assert list((stored / "figures").glob("*.png"))
  for name in (pipeline.CLASSIFIER_DIR, pipeline.DENOISER_DIR):
    checkpoints = stored / name
    assert [step for step in checkpoints.iterdir() if step.name.isdigit()], checkpoints
    assert list(checkpoints.rglob("commit_success.txt")), "Orbax took its local path"
  report = io_utils.read_json(f"{WORKDIR}/report.json")
  assert {row["defense"] for row in report["results"]} == {"none", "cafd"}

  # api.load from the bucket equals api.load from a local copy of the same files.
  size = config.data.image_size
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(8, size, size, 3)), jnp.float32)
  from_bucket = api.load(WORKDIR)
  local_copy = shutil.copytree(stored, bucket.parent / "local_copy")
  from_local = api.load(str(local_copy))
  np.testing.assert_array_equal(from_bucket.defended_logits(images),
                                from_local.defended_logits(images))

  # A rerun finds every stage's output in the bucket and trains nothing again.
  def checkpoint_files():
    return {path: path.stat().st_mtime_ns for name in (pipeline.CLASSIFIER_DIR,
                                                       pipeline.DENOISER_DIR)
            for path in (stored / name).rglob("*") if path.is_file()}

  before = checkpoint_files()
  pipeline.run(config, WORKDIR)
  assert checkpoint_files() == before


def test_bucket_workdir_without_its_client_package_is_one_clear_line(monkeypatch):
  monkeypatch.setitem(workdir_guard.BUCKET_PACKAGES, "gs", ("gcsfs", "no_such_package.sub"))
  if workdir_guard._installed("gcsfs"):  # pylint: disable=protected-access
    expected = "no_such_package.sub"
  else:
    expected = "gcsfs"
  with pytest.raises(workdir_guard.WorkdirError, match=f"needs .*{expected}.*pip install"):
    workdir_guard.check_storage(WORKDIR)
  with pytest.raises(workdir_guard.WorkdirError, match="ftp:// is not supported"):
    workdir_guard.check_storage("ftp://host/run")
  workdir_guard.check_storage("runs/local")  # local paths need nothing


def test_uri_paths_keep_their_scheme():
  assert io_utils.normalised("gs://bucket/run/") == "gs://bucket/run"
  assert io_utils.normalised("runs/a/../b/") == "runs/b"
  assert str(io_utils.absolute("gs://bucket/run")) == "gs://bucket/run"
  assert os.path.isabs(io_utils.absolute("runs/b"))
  assert not io_utils.is_local("s3://bucket/x") and io_utils.is_local("/tmp/x")
