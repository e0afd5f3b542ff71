"""Attacks by name; each maps (logits_fn, x, y, key, **params) -> x_adv in [0, 1]."""

from typing import Callable

# Functions, not modules: the package re-exports functions named like their modules.
from cafd_jax.attacks.cw import cw_l2
from cafd_jax.attacks.ddn import ddn
from cafd_jax.attacks.fgsm import fgsm
from cafd_jax.attacks.mifgsm import mifgsm
from cafd_jax.attacks.pgd_suite import pgd_l2, pgd_linf

ATTACKS: dict[str, Callable] = {
    "fgsm": fgsm,
    "pgd": pgd_linf,
    "pgd_l2": pgd_l2,
    "mifgsm": mifgsm,
    "cw": cw_l2,
    "ddn": ddn,
}


def get(name: str) -> Callable:
  """The attack registered under ``name``; ValueError listing the known names otherwise."""
  try:
    return ATTACKS[name]
  except KeyError:
    raise ValueError(f"Unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}.") from None
