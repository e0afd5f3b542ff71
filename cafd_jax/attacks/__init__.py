"""Attacks. Each is a pure function of (fn, x, y, key, **params) -> x_adv, pixels in [0, 1].

``registry.ATTACKS`` names the logits-based ones; the CAF attack takes a CAF function instead.
"""

from cafd_jax.attacks.caf import caf_attack
from cafd_jax.attacks.pgd import projected_gradient_ascent
from cafd_jax.attacks.pgd_suite import pgd_l2, pgd_linf

pgd = pgd_linf  # the usual name

__all__ = ["caf_attack", "pgd", "pgd_l2", "pgd_linf", "projected_gradient_ascent"]
