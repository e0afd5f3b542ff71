"""The airbench-style fast target: patch whitening, its training tricks, and CAM/Grad-CAM/CAF."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from cafd_jax import api, attacks, config_checks, factory, io_utils, models, pipeline
from cafd_jax import workdir as workdir_guard
from cafd_jax.models import taps
from cafd_jax.train import classifier as classifier_train
from cafd_jax.train import common
from cafd_jax.train import denoiser as denoiser_train
from configs import tiny


def _blobs(num: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Two classes told apart by a colour shift and a bright corner, with pixel noise."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, num)
  images = rng.uniform(0.2, 0.6, (num, 32, 32, 3)).astype(np.float32)
  images[labels == 1, :, :, 0] += 0.3
  images[labels == 1, :8, :8, :] = 0.95
  return np.clip(images, 0, 1), labels.astype(np.int32)


def _state(name: str = "airbench93", width: float = 0.25, whiten: bool = True,
           norm_bias_lr_scale: float = 64.0, learning_rate: float = 0.2,
           optimizer: str = "sgd"):
  model = models.create_classifier(name, num_classes=2, width=width)
  tx = common.make_optimizer(optimizer, optax.constant_schedule(learning_rate), weight_decay=5e-4,
                             momentum=0.85, nesterov=True,
                             frozen=(models.WHITEN_LAYER,) if whiten else (),
                             norm_bias_lr_scale=norm_bias_lr_scale, muon_lr_scale=0.5)
  return common.create_state(model, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), tx)


def _fit(state, images: np.ndarray, labels: np.ndarray, steps: int = 12):
  """``steps`` augmented training steps on one batch; the state and the losses."""
  losses = []
  for step in range(steps):
    state, metrics = classifier_train.train_step(
        state, jnp.asarray(images), jnp.asarray(labels), jax.random.key(step), True, 1, 0.2, 2)
    losses.append(float(metrics["loss"]))
  return state, losses


def test_whitening_kernel_decorrelates_patches():
  rng = np.random.default_rng(1)
  smooth = rng.normal(size=(64, 33, 33, 3))
  images = (smooth[:, 1:, 1:] + smooth[:, :-1, :-1] + 0.5 * smooth[:, 1:, :-1]).astype(np.float32)
  kernel = models.whitening_kernel(images, patch_size=2)
  assert kernel.shape == (2, 2, 3, 24)
  np.testing.assert_allclose(kernel[..., 12:], -kernel[..., :12])
  outputs = jax.lax.conv_general_dilated(jnp.asarray(images), jnp.asarray(kernel[..., :12]),
                                         (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
  flat = np.asarray(outputs, np.float64).reshape(-1, 12)
  # Correlated inputs come out uncorrelated, with unit variance (eps=5e-4 shrinks it a little).
  np.testing.assert_allclose(flat.T @ flat / len(flat), np.eye(12), atol=2e-2)


def test_whitened_layer_stays_fixed_and_the_rest_trains():
  images, labels = _blobs(64)
  state = classifier_train.with_whitened_patches(_state(), images)
  expected = models.whitening_kernel(
      (images - np.array(models.common.CIFAR10_MEAN, np.float32))
      / np.array(models.common.CIFAR10_STD, np.float32))
  np.testing.assert_allclose(state.params[models.WHITEN_LAYER], expected, rtol=1e-6)
  before = jax.tree.map(np.array, state.params)
  state, losses = _fit(state, images, labels)
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses  # the loss falls
  np.testing.assert_array_equal(state.params[models.WHITEN_LAYER], before[models.WHITEN_LAYER])
  for name in ("block0_conv0", "whiten_bias", "head"):
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b),
                                           state.params[name], before[name]))
    assert any(changed), name


def test_norm_biases_take_the_scaled_learning_rate():
  images, labels = _blobs(32)
  moves = {}
  for scale in (1.0, 64.0):
    state = _state(whiten=False, norm_bias_lr_scale=scale, learning_rate=1e-3)
    before = np.array(state.params["block0_norm0"]["bias"])
    conv_before = np.array(state.params["block0_conv0"]["kernel"])
    state, _ = classifier_train.train_step(state, jnp.asarray(images), jnp.asarray(labels),
                                           jax.random.key(0), False)
    moves[scale] = (np.abs(state.params["block0_norm0"]["bias"] - before).max(),
                    np.abs(state.params["block0_conv0"]["kernel"] - conv_before).max())
  np.testing.assert_allclose(moves[64.0][0], 64 * moves[1.0][0], rtol=1e-3)
  np.testing.assert_allclose(moves[64.0][1], moves[1.0][1], rtol=1e-5)


def test_dirac_initialisation_starts_as_identity():
  kernel = models.airbench.dirac_uniform(jax.random.key(0), (3, 3, 4, 6))
  x = jax.random.normal(jax.random.key(1), (2, 5, 5, 4))
  y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(y[..., :4], x, atol=1e-6)
  rest = np.asarray(kernel[..., 4:])
  assert 0 < np.abs(rest).max() <= 1 / np.sqrt(3 * 3 * 4)  # PyTorch's default bound


@pytest.mark.parametrize("weights, layer", [
    ("cam", taps.DEFAULT_LAYER), ("gradcam", taps.DEFAULT_LAYER),
    ("gradcampp", taps.DEFAULT_LAYER), ("gradcam", "block1_conv1:input")])  # the 7x7 map
def test_cam_gradcam_and_the_caf_attack_accept_it(weights, layer):
  images, labels = _blobs(4, seed=3)
  model = models.create_classifier("airbench93", num_classes=2, width=0.25)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  _, features = taps.apply_tapped(model, variables, jnp.asarray(images), taps.DEFAULT_LAYER)
  assert features.shape == (4, 3, 3, 32)  # the last block's map: 3x3, CAM's input
  caf_fn = denoiser_train.classifier_caf_fn(model, variables, "weighted_features", "label",
                                            weights, layer)
  attack = jax.jit(lambda x, y, key: attacks.caf_attack(caf_fn, x, y, key, eps=8 / 255,
                                                        step_size=2 / 255, steps=3))
  x, y = jnp.asarray(images), jnp.asarray(labels)
  x_adv = attack(x, y, jax.random.key(0))
  assert 0 < float(jnp.max(jnp.abs(x_adv - x))) <= 8 / 255 + 1e-6
  assert float(jnp.mean((caf_fn(x_adv, y) - caf_fn(x, y)) ** 2)) > 0


def test_valid_whitening_floors_the_odd_maps_as_airbench_and_same_keeps_them_even():
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  valid = models.create_classifier("airbench93", num_classes=2, width=0.25)
  variables = valid.init(jax.random.key(1), x)
  _, features = valid.apply(variables, x, return_features=True)
  assert features.shape == (2, 3, 3, 32)
  # The crop + fast pooling equals floor pooling of the odd map, gradients included.
  odd = jax.random.normal(jax.random.key(2), (2, 15, 15, 4))
  floor_pool = lambda h: jnp.sum(nn.max_pool(h, (2, 2), strides=(2, 2)) ** 2)
  ours = lambda h: jnp.sum(models.layers.max_pool_2x2(models.airbench._even_crop(h)) ** 2)
  np.testing.assert_allclose(ours(odd), floor_pool(odd), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(ours)(odd), jax.grad(floor_pool)(odd), rtol=1e-6)
  # "same" pads the whitening: the geometry of earlier runs, on the same parameters.
  same = models.create_classifier("airbench93", num_classes=2, width=0.25,
                                  whiten_padding="same")
  _, features = same.apply(variables, x, return_features=True)
  assert features.shape == (2, 4, 4, 32)
  config = tiny.get_config()
  config.model.whiten_padding = "full"
  with pytest.raises(config_checks.ConfigError, match="whiten_padding"):
    config_checks.validate(config)


def test_a_config_recorded_before_the_option_builds_the_padded_geometry(tmp_path):
  config = tiny.get_config()
  config.model.name, config.model.width = "airbench93", 0.25
  x = jnp.zeros((1, 32, 32, 3))
  shape = lambda c: factory.classifier(c, 2).init_with_output(
      jax.random.key(0), x, return_features=True)[0][1].shape
  assert shape(config) == (1, 3, 3, 32)
  recorded = config.to_dict()
  del recorded["model"]["whiten_padding"]  # as in a workdir's config.json of an earlier run
  io_utils.write_json(str(tmp_path / "config.json"), recorded)
  # Every reader of a recorded config builds what that run built: api.load and transfer targets.
  assert api.read_config(str(tmp_path)).model.whiten_padding == "same"
  assert shape(api.read_config(str(tmp_path))) == (1, 4, 4, 32)
  config.eval.transfer_workdirs = (str(tmp_path),)
  [(target, _)] = pipeline._transfer_targets(config)  # pylint: disable=protected-access
  assert shape(target) == (1, 4, 4, 32)
  # A recorded config that has the field, or another model's, is read as written.
  assert workdir_guard.upgrade(config.to_dict()) == config.to_dict()
  vgg = {"model": {"name": "vgg_tiny", "width": 1.0}}
  assert workdir_guard.upgrade(vgg) == vgg


def test_whitening_is_refused_for_other_models():
  config = tiny.get_config()
  config.classifier.whiten_patches = True
  with pytest.raises(config_checks.ConfigError, match="whiten_patches"):
    config_checks.validate(config)
  model = models.create_classifier("vgg_tiny", num_classes=2, width=0.25)
  state = common.create_state(model, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                              optax.sgd(0.1))
  with pytest.raises(ValueError, match="patch-whitening"):
    classifier_train.with_whitened_patches(state, np.zeros((4, 32, 32, 3), np.float32))


def test_lookahead_follows_then_averages_and_copies_back():
  from cafd_jax.train import classifier as classifier_train  # pylint: disable=g-import-not-at-top
  from cafd_jax.train import common  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  params = {"w": jnp.zeros(3)}
  state = common.TrainState.create(apply_fn=None, params=params, tx=optax.sgd(1.0),
                                   batch_stats={"m": jnp.zeros(2)})
  state = classifier_train.with_slow_copy(state)

  def step(state, value):  # a "training step" that moves the fast weights to ``value``
    state = state.replace(step=state.step + 1, params={"w": jnp.full(3, value)},
                          batch_stats={"m": jnp.full(2, value)})
    return classifier_train.lookahead(state, start_step=10, total_steps=20)

  for value in range(1, 6):  # step 5: a sync before the start: the slow copy follows
    state = step(state, float(value))
  np.testing.assert_array_equal(state.slow["params"]["w"], 5.0)
  np.testing.assert_array_equal(state.params["w"], 5.0)
  for value in range(6, 16):  # step 10 follows; step 15 averages: rho = 0.95^5 (15/20)^3
    state = step(state, float(value))
  rho = 0.95**5 * (15 / 20) ** 3
  expected = rho * 10.0 + (1 - rho) * 15.0
  np.testing.assert_allclose(state.params["w"], expected, rtol=1e-6)  # copied back
  np.testing.assert_allclose(state.slow["batch_stats"]["m"], expected, rtol=1e-6)
  state = step(state, 100.0)  # step 16: no sync
  np.testing.assert_array_equal(state.params["w"], 100.0)


def test_alternating_flips_follow_the_epoch_of_the_step():
  """Epoch 1 (step = steps_per_epoch) mirrors what epoch 0 showed: the same loss when the
  images come mirrored; a step that ignored the epoch would see them the other way."""
  images, labels = _blobs(16)
  mirrored = images[:, :, ::-1]
  first = jnp.asarray(np.arange(16) % 2, jnp.uint8)

  def loss(batch, step):
    state = _state(whiten=False).replace(step=step)
    _, metrics = classifier_train.train_step(
        state, jnp.asarray(batch), jnp.asarray(labels), jax.random.key(0), True,
        crop_padding=0, first_epoch_flips=first, steps_per_epoch=4)
    return float(metrics["loss"])

  assert loss(images, 0) == pytest.approx(loss(mirrored, 4), rel=1e-5)
  assert loss(images, 3) == pytest.approx(loss(images, 0), rel=1e-5)  # still epoch 0
  assert loss(images, 0) != pytest.approx(loss(mirrored, 0), rel=1e-3)


@pytest.mark.parametrize("flip, augmented, needle", [("sometimes", True, "must be one of"),
                                                      ("alternating", False, "augment=True")])
def test_bad_flip_settings_are_refused(flip, augmented, needle):
  config = tiny.get_config()
  config.classifier.flip, config.classifier.augment = flip, augmented
  with pytest.raises(config_checks.ConfigError, match="classifier.flip") as error:
    config_checks.validate(config)
  assert needle in str(error.value)


def test_alternating_flips_train_the_classifier_stage(tmp_path):
  from conftest import run_main  # pylint: disable=g-import-not-at-top
  result = run_main(tmp_path / "work", "--config.stages=train_classifier",
                    "--config.classifier.flip=alternating", "--config.classifier.augment=True",
                    "--config.classifier.num_epochs=2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "test accuracy" in result.stdout


def test_newton_schulz_keeps_the_singular_vectors_and_evens_the_values():
  rng = np.random.default_rng(0)
  left, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  right, _ = np.linalg.qr(rng.normal(size=(20, 6)))
  values = np.array([50.0, 10.0, 3.0, 1.0, 0.5, 0.3])  # a condition number of about 170
  matrix = (left * values) @ right.T
  for m in (matrix, matrix.T):  # wide and tall
    ortho = np.asarray(common.orthogonalize(jnp.asarray(m, jnp.float32)), np.float64)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    diagonal = np.diag(u.T @ ortho @ vt.T)  # the new singular values, in the old basis
    np.testing.assert_allclose(u.T @ ortho @ vt.T, np.diag(diagonal), atol=1e-4)
    # Three steps (airbench's) bring a spread of 170 down to a few; none change sign.
    assert np.all((diagonal > 0.2) & (diagonal < 1.6)), diagonal
    assert diagonal.max() / diagonal.min() < 6, diagonal


def test_muon_steps_the_kernels_on_a_fixed_sphere_and_sgd_the_rest():
  images, labels = _blobs(64)
  state = classifier_train.with_whitened_patches(_state(optimizer="muon"), images)
  before = jax.tree.map(np.array, state.params)
  state, losses = _fit(state, images, labels)
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
  np.testing.assert_array_equal(state.params[models.WHITEN_LAYER], before[models.WHITEN_LAYER])
  # A kernel scaled away from norm sqrt(out) is rescaled to it before a step of 0.1 times an
  # about-orthogonal update (norm about sqrt(out)), so it ends within a few percent of it.
  params = dict(state.params)
  params["block1_conv1"] = {"kernel": 3 * params["block1_conv1"]["kernel"]}
  state, _ = classifier_train.train_step(state.replace(params=params), jnp.asarray(images),
                                         jnp.asarray(labels), jax.random.key(99), True, 1, 0.2, 2)
  out = state.params["block1_conv1"]["kernel"].shape[-1]
  norm = float(jnp.linalg.norm(state.params["block1_conv1"]["kernel"]))
  assert abs(norm - np.sqrt(out)) < 0.05 * np.sqrt(out), (norm, np.sqrt(out))
  for name in ("whiten_bias", "head", "block0_norm0"):  # the SGD groups move
    assert not all(jax.tree.leaves(jax.tree.map(np.allclose, state.params[name], before[name])))


def test_muon_config_trains_the_classifier_stage(tmp_path):
  from conftest import run_main  # pylint: disable=g-import-not-at-top
  result = run_main(tmp_path / "work", "--config.stages=train_classifier",
                    "--config.classifier.optimizer=muon", "--config.classifier.num_epochs=2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "test accuracy" in result.stdout
