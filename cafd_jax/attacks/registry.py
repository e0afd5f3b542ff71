"""Attacks by name; each maps (logits_fn, x, y, key, **params) -> x_adv in [0, 1]."""

from typing import Callable

# Functions, not modules: the package re-exports functions named like their modules.
from cafd_jax.attacks.apgd import apgd_ce, apgd_dlr, apgd_targeted
from cafd_jax.attacks.autoattack import autoattack
from cafd_jax.attacks.cw import cw_l2
from cafd_jax.attacks.ddn import ddn
from cafd_jax.attacks.fab import fab_targeted
from cafd_jax.attacks.fgsm import fgsm
from cafd_jax.attacks.mifgsm import mifgsm
from cafd_jax.attacks.pgd_suite import pgd_l2, pgd_linf
from cafd_jax.attacks.spatial import spatial_transform
from cafd_jax.attacks.square import square_linf
from cafd_jax.attacks.wasserstein import wasserstein

ATTACKS: dict[str, Callable] = {
    "fgsm": fgsm,
    "pgd": pgd_linf,
    "pgd_l2": pgd_l2,
    "mifgsm": mifgsm,
    "cw": cw_l2,
    "ddn": ddn,
    "apgd_ce": apgd_ce,
    "apgd_dlr": apgd_dlr,
    "apgd_t": apgd_targeted,
    "fab_t": fab_targeted,
    "square": square_linf,
    "autoattack": autoattack,
    "sta": spatial_transform,
    "wasserstein": wasserstein,
}

# The threat model each attack's budget lives in (None: unbounded / minimal-norm).
NORMS: dict[str, str | None] = {
    "fgsm": "linf", "pgd": "linf", "mifgsm": "linf", "apgd_ce": "linf", "apgd_dlr": "linf",
    "apgd_t": "linf", "fab_t": "linf", "square": "linf", "autoattack": "linf",
    "pgd_l2": "l2", "cw": None, "ddn": None, "sta": None, "wasserstein": "wasserstein",
}
# Gradient-free attacks: they only call logits_fn forward.
SCORE_BASED = ("square",)


def get(name: str) -> Callable:
  """The attack registered under ``name``; ValueError listing the known names otherwise."""
  try:
    return ATTACKS[name]
  except KeyError:
    raise ValueError(f"Unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}.") from None
