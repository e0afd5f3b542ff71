"""Attacks. Each is a pure function of (fn, x, y, key, **params) -> x_adv, pixels in [0, 1]."""

from cafd_jax.attacks.caf import caf_attack
from cafd_jax.attacks.pgd import pgd, projected_gradient_ascent

__all__ = ["caf_attack", "pgd", "projected_gradient_ascent"]
