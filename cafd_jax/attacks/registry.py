"""Attacks by name; each maps (logits_fn, x, y, key, **params) -> x_adv in [0, 1]."""

from typing import Callable

from cafd_jax.attacks import cw, ddn, fgsm, mifgsm, pgd_suite

ATTACKS: dict[str, Callable] = {
    "fgsm": fgsm.fgsm,
    "pgd": pgd_suite.pgd_linf,
    "pgd_l2": pgd_suite.pgd_l2,
    "mifgsm": mifgsm.mifgsm,
    "cw": cw.cw_l2,
    "ddn": ddn.ddn,
}


def get(name: str) -> Callable:
  """The attack registered under ``name``; ValueError listing the known names otherwise."""
  try:
    return ATTACKS[name]
  except KeyError:
    raise ValueError(f"Unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}.") from None
