"""Auto-PGD: schedule and losses against the reference, constraints, strength on a trained model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cafd_jax import losses
from cafd_jax.attacks import apgd
from conftest import assert_in_box

ATTACKS = {
    "apgd_ce": apgd.apgd_ce,
    "apgd_dlr": apgd.apgd_dlr,
    "apgd_targeted": apgd.apgd_targeted,
}


def _linear_apply(weights, x):
  return x.reshape(x.shape[0], -1) @ weights


# A model is (apply_fn, params); params are jit arguments, not constants baked into the graph.
LINEAR = (_linear_apply,
          jnp.sin(jnp.arange(32 * 32 * 3 * 10, dtype=jnp.float32)).reshape(-1, 10) / 20)


@functools.lru_cache(maxsize=None)
def _jitted(name, apply_fn, **static):
  """One compiled attack per (name, apply_fn, static params); eps stays traced."""
  attack = ATTACKS[name]

  def run(params, x, y, key, eps):
    return attack(functools.partial(apply_fn, params), x, y, key, eps=eps, **static)

  return jax.jit(run)


def _run(name, model, x, y, key, eps, **static):
  apply_fn, params = model
  return _jitted(name, apply_fn, **static)(params, x, y, key, jnp.float32(eps))


@functools.lru_cache(maxsize=None)
def _jitted_targeted_once(apply_fn, **static):
  def run(params, x, y, target, key, eps):
    return apgd.apgd_targeted_once(functools.partial(apply_fn, params), x, y, target, key,
                                   eps=eps, **static)
  return jax.jit(run)


@functools.lru_cache(maxsize=None)
def _jitted_predict(apply_fn):
  return jax.jit(lambda params, x: jnp.argmax(apply_fn(params, x), -1))


def _predict(model, x):
  apply_fn, params = model
  return np.asarray(_jitted_predict(apply_fn)(params, x))


def _accuracy(model, x, y):
  return float(np.mean(_predict(model, x) == np.asarray(y)))


@pytest.fixture(scope="module")
def batch():
  x = jax.random.uniform(jax.random.key(0), (8, 32, 32, 3))
  x = x.at[0].set(0.0).at[1].set(1.0)  # pixels at the box edges
  return x, jnp.asarray(_predict(LINEAR, x))  # all correctly classified


@pytest.fixture(scope="module")
def tiny(trained_tiny):
  """((apply_fn, variables), x, y): 16 test images the trained model classifies correctly."""
  model, variables, test_set, _ = trained_tiny
  tiny_model = (model.apply, variables)
  images, labels = jnp.asarray(test_set.images[:64]), np.asarray(test_set.labels[:64])
  keep = np.flatnonzero(_predict(tiny_model, images) == labels)[:16]
  assert len(keep) == 16
  return tiny_model, images[keep], jnp.asarray(labels[keep])


def _paper_checkpoints(steps):
  """Croce & Hein (2020): p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
  p = [0.0, 0.22]
  while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
    p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
  return [round(pj * steps) for pj in p[1:]]


def test_checkpoints_for_100_steps_follow_the_paper():
  expected = _paper_checkpoints(100)
  assert expected == [22, 41, 57, 70, 80, 87, 93, 99]
  schedule = apgd.checkpoint_schedule(100)
  assert [i + 1 for i, _ in schedule] == expected  # checked after that many steps
  assert [w for _, w in schedule] == list(np.diff([0] + expected))


@pytest.mark.parametrize("steps", [pytest.param(1, marks=pytest.mark.slow),
                                   pytest.param(37, marks=pytest.mark.slow), 100])
def test_checkpoints_match_torchattacks(steps, monkeypatch):
  """Records where torchattacks' APGD checks its step size, and with which window."""
  torch = pytest.importorskip("torch")
  torchattacks = pytest.importorskip("torchattacks")
  torch.manual_seed(0)
  model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
  attack = torchattacks.APGD(model, eps=8 / 255, steps=steps, loss="ce")
  calls = []
  check = attack.check_oscillation

  def recording_check(loss_steps, i, k, *args, **kwargs):
    calls.append((int(i), int(k)))
    return check(loss_steps, i, k, *args, **kwargs)

  monkeypatch.setattr(attack, "check_oscillation", recording_check)
  attack.attack_single_run(torch.rand(2, 3, 2, 2), torch.tensor([0, 1]))
  assert apgd.checkpoint_schedule(steps) == calls


def _mlp_models(rng):
  """The same small tanh MLP on 8x8x3 images, in JAX (NHWC) and in torch (NCHW), float64."""
  torch = pytest.importorskip("torch")
  w1 = rng.normal(size=(8 * 8 * 3, 32)) * 0.3
  w2 = rng.normal(size=(32, 10)) * 0.5

  def jax_logits(z):
    return jnp.tanh(z.reshape(z.shape[0], -1) @ w1) @ w2

  class TorchMLP(torch.nn.Module):

    def forward(self, z):
      z = z.permute(0, 2, 3, 1).reshape(z.shape[0], -1)
      return torch.tanh(z @ torch.from_numpy(w1)) @ torch.from_numpy(w2)

  return jax_logits, TorchMLP()


class _Recording:
  """Wraps a logits function and keeps every input it sees (also inside jit, via a callback)."""

  def __init__(self, logits_fn):
    self.logits_fn, self.inputs = logits_fn, []

  def __call__(self, z):
    jax.debug.callback(lambda v: self.inputs.append(np.array(v)), z, ordered=True)
    return self.logits_fn(z)


@pytest.fixture()
def float64():
  """JAX and torch in float64, so rounding rarely flips a comparison of two near-equal losses."""
  torch = pytest.importorskip("torch")
  default_dtype, x64 = torch.get_default_dtype(), jax.config.jax_enable_x64
  torch.set_default_dtype(torch.float64)
  jax.config.update("jax_enable_x64", True)  # globally: debug callbacks run in other threads
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", x64)
    torch.set_default_dtype(default_dtype)


@pytest.mark.parametrize("loss,norm", [
    pytest.param("ce", "linf", marks=pytest.mark.slow), ("dlr", "linf"),
    pytest.param("targeted", "linf", marks=pytest.mark.slow), ("ce", "l2"),
    pytest.param("dlr", "l2", marks=pytest.mark.slow),
])
def test_single_run_matches_torchattacks_from_the_same_start(loss, norm, float64, monkeypatch):
  """Every iterate of one 25-step run (checks after 5, 4, 3, 2, 1, 1, ... steps) on a small
  MLP, both frameworks starting from the same random start (torch.rand / randn patched)."""
  del float64
  torch = pytest.importorskip("torch")
  torchattacks = pytest.importorskip("torchattacks")
  rng = np.random.default_rng(0)
  jax_logits, torch_model = _mlp_models(rng)
  x = jnp.asarray(rng.uniform(size=(32, 8, 8, 3)))
  clean_logits = jax_logits(x)
  y = jnp.argmax(clean_logits, -1)
  eps, steps = (1.5 / 255 if norm == "linf" else 0.1), 25
  reference_norm = {"linf": "Linf", "l2": "L2"}[norm]
  if loss == "targeted":
    target = jnp.argsort(clean_logits, axis=-1)[:, -2]
    objective = lambda logits: apgd.targeted_dlr_loss(logits, y, target)
    reference = torchattacks.APGDT(torch_model, norm=reference_norm, eps=eps, steps=steps)
    reference.target_class = 2
  else:
    objective = {"ce": lambda logits: losses.cross_entropy(logits, y),
                 "dlr": lambda logits: apgd.dlr_loss(logits, y)}[loss]
    reference = torchattacks.APGD(torch_model, norm=reference_norm, eps=eps, steps=steps,
                                  loss=loss)
  # The reference's random start, from NumPy noise (no costly float64 PRNG compilation).
  noise = rng.uniform(size=x.shape) if norm == "linf" else rng.normal(size=x.shape)
  t = 2.0 * noise - 1.0 if norm == "linf" else noise
  t_norms = (np.abs(t).max(axis=(1, 2, 3)) if norm == "linf"
             else np.sqrt(np.sum(t * t, axis=(1, 2, 3))) + 1e-12)
  x_start = np.clip(np.asarray(x) + eps * t / t_norms[:, None, None, None], 0.0, 1.0)
  ours = _Recording(jax_logits)
  x_adv, fooled = jax.jit(lambda start: apgd._single_run(  # pylint: disable=protected-access
      objective, ours, x, y, start, eps=eps, steps=steps, rho=0.75, norm=norm))(x_start)
  jax.effects_barrier()

  patched = lambda *_, **__: torch.from_numpy(noise.copy()).permute(0, 3, 1, 2).contiguous()
  monkeypatch.setattr(torch, "rand" if norm == "linf" else "randn", patched)
  theirs = []
  monkeypatch.setattr(reference, "get_logits", lambda z: (
      theirs.append(z.detach().permute(0, 2, 3, 1).numpy().copy()), torch_model(z))[1])
  _, robust_t, _, x_adv_t = reference.attack_single_run(
      torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous(),
      torch.from_numpy(np.array(y)).long())
  if loss == "targeted":
    theirs = theirs[1:]  # APGDT first evaluates the clean input, to pick the target

  assert x_adv.dtype == jnp.float64 and len(ours.inputs) == len(theirs) == steps + 1
  iterates = np.stack(ours.inputs)
  assert iterates.min() >= 0.0 and iterates.max() <= 1.0
  deltas = (iterates - np.asarray(x)).reshape(steps + 1, len(x), -1)
  radii = np.abs(deltas).max(-1) if norm == "linf" else np.linalg.norm(deltas, axis=-1)
  assert radii.max() <= eps * (1 + 1e-9)
  # Late in a run the iterates barely move and successive losses can tie to the last bit, so
  # a few examples may part ways there, by a different step-size decision.
  gap = np.abs(iterates - np.stack(theirs)).max(axis=(2, 3, 4))  # [steps+1, B]
  assert np.all(gap[:16] <= 1e-6), np.flatnonzero(np.any(gap[:16] > 1e-6, axis=0))
  same = np.all(gap <= 1e-6, axis=0)
  assert same.mean() >= 29 / 32, np.flatnonzero(~same)
  fooled = np.asarray(fooled)
  assert 0.2 <= fooled.mean() <= 0.8
  np.testing.assert_array_equal(fooled, ~robust_t.numpy().astype(bool))
  x_adv_t = x_adv_t.detach().permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(x_adv)[same], x_adv_t[same], atol=1e-6)


def test_dlr_losses_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 7)).astype(np.float32)
  y = np.array([0, 1, 2, 3, 4, 5])
  logits[0, 0] = 5.0  # true class on top
  target = np.array([3, 0, 6, 1, 2, 4])
  ordered = np.sort(logits, axis=1)
  z_y = logits[np.arange(6), y]
  others = np.where(np.eye(7, dtype=bool)[y], -np.inf, logits).max(axis=1)
  expected = -(z_y - others) / (ordered[:, -1] - ordered[:, -3] + 1e-12)
  np.testing.assert_allclose(apgd.dlr_loss(jnp.asarray(logits), jnp.asarray(y)), expected,
                             rtol=1e-6)
  expected_targeted = -(z_y - logits[np.arange(6), target]) / (
      ordered[:, -1] - 0.5 * ordered[:, -3] - 0.5 * ordered[:, -4] + 1e-12)
  np.testing.assert_allclose(
      apgd.targeted_dlr_loss(jnp.asarray(logits), jnp.asarray(y), jnp.asarray(target)),
      expected_targeted, rtol=1e-6)


def test_dlr_gradient_vanishes_where_the_true_class_ranks_third():
  logits = jnp.array([[3.0, 2.0, 1.0, 0.5], [1.0, 2.0, 3.0, 0.5]])
  y = jnp.array([2, 2])
  grad = jax.grad(lambda z: jnp.sum(apgd.dlr_loss(z, y)))(logits)
  np.testing.assert_allclose(apgd.dlr_loss(logits, y)[0], 1.0)
  assert np.all(np.asarray(grad[0]) == 0.0)
  assert np.any(np.asarray(grad[1]) != 0.0)


@pytest.mark.parametrize("name,norm,eps", [
    ("apgd_ce", "linf", 8 / 255),
    pytest.param("apgd_dlr", "linf", 8 / 255, marks=pytest.mark.slow),
    ("apgd_targeted", "linf", 8 / 255),
    pytest.param("apgd_ce", "l2", 1.0, marks=pytest.mark.slow),  # L2 also in the torch check
])
def test_attack_stays_in_box_and_ball_is_deterministic_and_idle_at_zero_eps(batch, name, norm,
                                                                              eps):
  x, y = batch
  static = dict(steps=6, restarts=2, norm=norm)
  if name == "apgd_targeted":
    static["n_target_classes"] = 2
  x_adv = _run(name, LINEAR, x, y, jax.random.key(1), eps, **static)
  assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
  assert_in_box(x_adv)
  delta = np.asarray(x_adv - x).reshape(len(x), -1)
  if norm == "linf":
    assert np.abs(delta).max() <= eps + 1e-6
  else:
    assert np.linalg.norm(delta, axis=1).max() <= eps + 1e-4
  np.testing.assert_array_equal(x_adv, _run(name, LINEAR, x, y, jax.random.key(1), eps, **static))
  # Each example comes back unchanged or misclassified; most are fooled.
  changed = np.any(delta != 0, axis=1)
  fooled = _predict(LINEAR, x_adv) != np.asarray(y)
  assert np.all(fooled | ~changed) and fooled.mean() >= 0.5
  np.testing.assert_array_equal(_run(name, LINEAR, x, y, jax.random.key(1), 0.0, **static), x)


def test_unknown_loss_and_norm_are_rejected(batch):
  x, y = batch
  logits_fn = functools.partial(*LINEAR)
  with pytest.raises(ValueError, match="loss"):
    apgd.apgd(logits_fn, x, y, jax.random.key(0), loss="cw")
  with pytest.raises(ValueError, match="norm"):
    apgd.apgd(logits_fn, x, y, jax.random.key(0), norm="l1")
  with pytest.raises(ValueError, match="n_target_classes"):
    apgd.apgd_targeted(logits_fn, x, y, jax.random.key(0), n_target_classes=10)


def test_ce_success_grows_with_eps_and_reaches_all(tiny):
  model, x, y = tiny
  errors = [1.0 - _accuracy(model, _run("apgd_ce", model, x, y, jax.random.key(0), eps,
                                            steps=10), y)
            for eps in (0.0, 0.5 / 255, 1 / 255, 2 / 255, 16 / 255)]
  assert errors == sorted(errors), errors
  assert errors[0] == 0.0 and errors[-1] == 1.0, errors
  assert 0.0 < errors[1] < 1.0, errors  # the small budgets are not trivial


def test_dlr_fools_every_image_at_a_large_eps(tiny):
  model, x, y = tiny
  x_adv = _run("apgd_dlr", model, x, y, jax.random.key(0), 16 / 255, steps=10)
  assert _accuracy(model, x_adv, y) == 0.0


@pytest.mark.slow
def test_restarts_keep_earlier_successes(tiny):
  model, x, y = tiny
  one = _run("apgd_ce", model, x, y, jax.random.key(3), 0.5 / 255, steps=10)
  three = _run("apgd_ce", model, x, y, jax.random.key(3), 0.5 / 255, steps=10, restarts=3)
  fooled_one = _predict(model, one) != np.asarray(y)
  fooled_three = _predict(model, three) != np.asarray(y)
  assert 0 < fooled_one.sum() < len(y)
  assert np.all(fooled_three[fooled_one]) and fooled_three.sum() >= fooled_one.sum()
  np.testing.assert_array_equal(np.asarray(three)[fooled_one], np.asarray(one)[fooled_one])
  np.testing.assert_array_equal(np.asarray(three)[~fooled_three], np.asarray(x)[~fooled_three])


def test_targeted_run_lifts_its_target_above_the_true_class(tiny):
  """The targeted DLR loss pushes z_t above z_y; it need not make t the top class, so this
  checks the former (on this model only about a third of the runs end on t)."""
  model, x, y = tiny
  apply_fn, params = model
  offsets = jax.random.randint(jax.random.key(4), y.shape, 1, 10)
  target = (y + offsets) % 10
  x_adv = _jitted_targeted_once(apply_fn, steps=20)(params, x, y, target, jax.random.key(0),
                                                    jnp.float32(16 / 255))
  assert float(jnp.max(jnp.abs(x_adv - x))) <= 16 / 255 + 1e-6
  logits = np.asarray(apply_fn(params, x_adv))
  rows = np.arange(len(y))
  lifted = logits[rows, np.asarray(target)] > logits[rows, np.asarray(y)]
  fooled = _predict(model, x_adv) != np.asarray(y)
  assert lifted.mean() >= 14 / 16 and np.all(fooled[lifted])
  np.testing.assert_array_equal(np.asarray(x_adv)[~fooled], np.asarray(x)[~fooled])


@pytest.mark.slow
def test_targeted_attack_fools_the_trained_model(tiny):
  model, x, y = tiny
  x_adv = _run("apgd_targeted", model, x, y, jax.random.key(0), 2 / 255, steps=10,
               n_target_classes=3)
  assert _accuracy(model, x_adv, y) <= 0.25
