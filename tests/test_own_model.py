"""A user's own Flax classifier (examples/small_cnn.py), imported by path and defended."""

import json

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from cafd_jax import api, config_checks, imported

from conftest import run_main

NAME = "import:examples.small_cnn:make"


def test_own_classifier_in_cafd_denoiser_trained_report_written(tmp_path):
  from examples import small_cnn  # pylint: disable=g-import-not-at-top
  model = small_cnn.make(num_classes=10)
  variables = model.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))
  path = tmp_path / "variables.msgpack"
  path.write_bytes(flax.serialization.to_bytes(variables))
  workdir = tmp_path / "own"
  result = run_main(workdir, f"--config.model.name={NAME}",
                    f"--config.classifier.init_from={path}", "--config.classifier.num_epochs=0",
                    "--config.eval.attacks=none,pgd")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"[train_classifier] using {path} as it is" in result.stdout
  assert "[train_denoiser] step" in result.stdout
  rows = json.loads((workdir / "report.json").read_text())["results"]
  assert {(r["attack"], r["defense"]) for r in rows} == {
      (a, d) for a in ("none", "pgd") for d in ("none", "cafd")}
  images = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(api.load(str(workdir)).classify(images),
                             model.apply(variables, images), rtol=1e-5, atol=1e-5)


class _FlattenHead(nn.Module):
  @nn.compact
  def __call__(self, images, train: bool = False):
    x = nn.relu(nn.Conv(8, (3, 3), name="conv")(images))
    return nn.Dense(10, name="out")(x.reshape(len(x), -1))


def test_a_model_without_cam_names_the_options_to_set(tiny_config):
  tiny_config.model.name = "import:somewhere:make"
  model = _FlattenHead()
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(config_checks.ConfigError) as error:
    imported.check_caf_layer(tiny_config, model, variables)
  assert "no GAP + dense head" in str(error.value)
  assert "--config.caf.weights=gradcam" in str(error.value) and "conv, out" in str(error.value)
  tiny_config.caf.weights, tiny_config.caf.feature_layer = "gradcam", "conv"
  imported.check_caf_layer(tiny_config, model, variables)  # fits now
  tiny_config.caf.feature_layer = "conv2"
  with pytest.raises(config_checks.ConfigError, match="is not a layer of"):
    imported.check_caf_layer(tiny_config, model, variables)


@pytest.mark.parametrize("name, message", [
    ("import:no_such_module:make", "cannot import no_such_module"),
    ("import:examples.small_cnn:nothing", "has no callable 'nothing'"),
    ("import:examples.small_cnn", "write import:package.module:factory"),
])
def test_bad_import_names_fail_in_one_line(tmp_path, name, message):
  result = run_main(tmp_path / "work", f"--config.model.name={name}")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], result.stderr


def test_variables_of_another_model_are_refused_in_one_line(tmp_path):
  path = tmp_path / "other.msgpack"
  path.write_bytes(flax.serialization.to_bytes({"params": {"w": np.zeros(3, np.float32)}}))
  result = run_main(tmp_path / "work", f"--config.model.name={NAME}",
                    f"--config.classifier.init_from={path}", "--config.classifier.num_epochs=0",
                    "--config.stages=train_classifier")
  assert result.returncode == 2
  assert result.stderr.strip().startswith(f"error: config.classifier.init_from: {path} does not "
                                          f"fit the model's params"), result.stderr
