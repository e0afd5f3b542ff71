"""Our attacks against independent implementations, on the same weights and 500 images.

foolbox 3 checks PGD, CW-L2 and DDN; torchattacks checks APGD-CE, APGD-T, FAB-T and Square.
Both run on a PyTorch twin of the trained Flax model (logits agree to 1e-4). Each budget is
one where the reference leaves 20-80% accuracy, and that is asserted too; ours must land
within 2 percentage points of the reference. Run with
``CAFD_REQUIRE_CROSSCHECK=1 python -m pytest -q -m crosscheck`` (CI does, as its second step).
"""

import os

import numpy as np
import pytest

from cafd_jax.attacks import apgd, cw, ddn, fab, pgd_suite, square

if os.environ.get("CAFD_REQUIRE_CROSSCHECK"):
  import foolbox  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torchattacks  # pylint: disable=g-import-not-at-top
else:
  torch = pytest.importorskip("torch", reason="cross-checks need torch==2.13.0 (test-only)")
  foolbox = pytest.importorskip("foolbox", reason="cross-checks need foolbox==3.3.4")
  torchattacks = pytest.importorskip("torchattacks", reason="cross-checks need torchattacks")

import crosscheck_support as support  # pylint: disable=g-import-not-at-top

pytestmark = [pytest.mark.slow, pytest.mark.crosscheck]

TOLERANCE = 0.02
# Budgets where the reference leaves 20-80% accuracy on this model (asserted below).
LINF_EPS = 1 / 255
L2_EPS = 0.15
STEPS = 10
# Shorter than the reference defaults (CW 100 x 4, DDN 100) to fit CI's time; same on both sides.
CW_STEPS, DDN_STEPS = 30, 30


@pytest.fixture(scope="module")
def setup():
  torch.manual_seed(0)
  model, variables, x, y = support.train_model()
  twin = support.TorchVGG(variables)
  return model, variables, twin, x, y


def _check(name, ours, reference, clean):
  print(f"{name}: clean {clean:.3f}  ours {ours:.3f}  reference {reference:.3f}")
  assert 0.2 <= reference <= 0.8, f"budget out of the 20-80% band: {reference:.3f}"
  assert abs(ours - reference) <= TOLERANCE, (ours, reference)


def _torch_accuracy(twin, x_adv_nchw, y):
  with torch.no_grad():
    return float((twin(x_adv_nchw).argmax(1).numpy() == np.asarray(y)).mean())


def _foolbox_robust_accuracy(twin, attack, x, y, eps):
  fmodel = foolbox.PyTorchModel(twin, bounds=(0, 1))
  _, _, success = attack(fmodel, support.to_nchw(x), torch.from_numpy(np.asarray(y)).long(),
                         epsilons=[eps])
  return float(1.0 - success.float().mean())


def test_torch_twin_computes_the_same_logits(setup):
  model, variables, twin, x, _ = setup
  with torch.no_grad():
    theirs = twin(support.to_nchw(x)).numpy()
  ours = np.asarray(model.apply(variables, x))
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
  assert support.accuracy_jax(model, variables, x, np.argmax(theirs, -1)) == 1.0


def test_pgd_linf_agrees_with_foolbox(setup):
  model, variables, twin, x, y = setup
  step_size = LINF_EPS / 4
  x_adv = support.run_ours(pgd_suite.pgd_linf, model, variables, x, y, eps=LINF_EPS,
                           step_size=step_size, steps=STEPS, random_start=True)
  reference = _foolbox_robust_accuracy(
      twin, foolbox.attacks.LinfPGD(abs_stepsize=step_size, steps=STEPS, random_start=True),
      x, y, LINF_EPS)
  _check("pgd", support.accuracy_jax(model, variables, x_adv, y), reference,
         support.accuracy_jax(model, variables, x, y))


def test_cw_l2_agrees_with_foolbox(setup):
  model, variables, twin, x, y = setup
  params = dict(steps=CW_STEPS, confidence=1.0, initial_const=1.0, binary_search_steps=2)
  x_adv = support.run_ours(cw.cw_l2, model, variables, x, y, lr=0.01, **params)
  reference = _foolbox_robust_accuracy(
      twin, foolbox.attacks.L2CarliniWagnerAttack(stepsize=0.01, abort_early=False, **params),
      x, y, L2_EPS)
  _check("cw", support.robust_accuracy_l2(model, variables, x, x_adv, y, L2_EPS), reference,
         support.accuracy_jax(model, variables, x, y))


def test_ddn_agrees_with_foolbox(setup):
  model, variables, twin, x, y = setup
  # foolbox's DDN does not round to 1/255 levels (Rony et al.'s code does; our default).
  x_adv = support.run_ours(ddn.ddn, model, variables, x, y, steps=DDN_STEPS, gamma=0.05,
                           init_norm=1.0, quantize=False)
  ddn_reference = foolbox.attacks.DDNAttack(init_epsilon=1.0, steps=DDN_STEPS, gamma=0.05)
  reference = _foolbox_robust_accuracy(twin, ddn_reference, x, y, L2_EPS)
  _check("ddn", support.robust_accuracy_l2(model, variables, x, x_adv, y, L2_EPS), reference,
         support.accuracy_jax(model, variables, x, y))


def _torchattacks_accuracy(twin, attack, x, y):
  x_adv = attack(support.to_nchw(x), torch.from_numpy(np.asarray(y)).long())
  return _torch_accuracy(twin, x_adv, y), support.to_nhwc(x_adv)


def _ours_and_theirs(setup, ours_fn, ours_params, theirs):
  model, variables, twin, x, y = setup
  x_adv = support.run_ours(ours_fn, model, variables, x, y, **ours_params)
  assert np.max(np.abs(x_adv - x)) <= LINF_EPS + 1e-6
  reference, theirs_adv = _torchattacks_accuracy(twin, theirs(twin), x, y)
  assert np.max(np.abs(theirs_adv - x)) <= LINF_EPS + 1e-5
  return support.accuracy_jax(model, variables, x_adv, y), reference, support.accuracy_jax(
      model, variables, x, y)


def test_apgd_ce_agrees_with_torchattacks(setup):
  _check("apgd-ce", *_ours_and_theirs(
      setup, apgd.apgd, dict(eps=LINF_EPS, steps=STEPS, loss="ce"),
      lambda twin: torchattacks.APGD(twin, eps=LINF_EPS, steps=STEPS, loss="ce", seed=0)))


TARGETS = 2  # target classes for APGD-T and FAB-T (AutoAttack standard uses 9)


def test_apgd_t_agrees_with_torchattacks(setup):
  _check("apgd-t", *_ours_and_theirs(
      setup, apgd.apgd_targeted, dict(eps=LINF_EPS, steps=STEPS, n_target_classes=TARGETS),
      lambda twin: torchattacks.APGDT(twin, eps=LINF_EPS, steps=STEPS, seed=0,
                                      n_classes=TARGETS + 1)))


def test_fab_t_agrees_with_torchattacks(setup):
  _check("fab-t", *_ours_and_theirs(
      setup, fab.fab_targeted, dict(eps=LINF_EPS, steps=STEPS, n_target_classes=TARGETS),
      lambda twin: torchattacks.FAB(twin, eps=LINF_EPS, steps=STEPS, multi_targeted=True,
                                    n_classes=TARGETS + 1, seed=0)))


def test_square_agrees_with_torchattacks(setup):
  queries = 200
  _check("square", *_ours_and_theirs(
      setup, square.square_linf, dict(eps=LINF_EPS, n_queries=queries),
      lambda twin: torchattacks.Square(twin, eps=LINF_EPS, n_queries=queries, seed=0)))
