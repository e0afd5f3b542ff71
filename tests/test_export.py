"""The defended classifier exported with jax.export: same logits and VJP, loadable by jax alone."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export as jax_export

from cafd_jax import api, export

from conftest import ROOT


@pytest.fixture(scope="module")
def exported_file(finished_run, tmp_path_factory):
  workdir, _ = finished_run
  path = tmp_path_factory.mktemp("export") / "defended.jax"
  assert export.main(["--workdir", str(workdir), "--out", str(path)]) == 0
  return workdir, path


@pytest.mark.parametrize("batch", [1, 7])
def test_exported_logits_and_vjp_equal_the_api(exported_file, batch):
  workdir, path = exported_file
  restored = jax_export.deserialize(bytearray(path.read_bytes()))
  assert set(restored.platforms) >= {"cpu", "cuda"}
  defended = api.load(str(workdir))
  images = jnp.asarray(np.random.default_rng(batch).uniform(size=(batch, 32, 32, 3)),
                       jnp.float32)
  want, want_vjp = jax.vjp(defended.defended_logits, images)
  got, got_vjp = jax.vjp(restored.call, images)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  cotangent = jnp.asarray(np.random.default_rng(0).normal(size=want.shape), jnp.float32)
  np.testing.assert_allclose(got_vjp(cotangent)[0], want_vjp(cotangent)[0], rtol=1e-4,
                             atol=1e-6)


def test_the_exported_file_loads_and_differentiates_with_jax_alone(exported_file):
  _, path = exported_file
  script = (
      "import sys, jax, jax.numpy as jnp\n"
      "from jax import export\n"
      f"defended = export.deserialize(bytearray(open({str(path)!r}, 'rb').read()))\n"
      "x = jnp.full((3, 32, 32, 3), 0.5)\n"
      "g = jax.grad(lambda x: defended.call(x)[:, 0].sum())(x)\n"
      "assert defended.call(x).shape == (3, 10) and g.shape == x.shape\n"
      "assert not any(m.split('.')[0] in ('flax', 'cafd_jax', 'optax', 'orbax') "
      "for m in sys.modules), sorted(m for m in sys.modules if 'flax' in m)\n"
      "print('ok')\n")
  result = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_bad_export_requests_fail_in_one_line(finished_run, tmp_path, capsys):
  workdir, _ = finished_run
  assert export.main(["--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "f")]) == 2
  assert capsys.readouterr().err.startswith(f"error: No config.json in {tmp_path / 'none'}")
  assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "f"),
                      "--platforms", "gpu"]) == 2
  assert "--platforms must name some of" in capsys.readouterr().err
  assert not (tmp_path / "f").exists()
