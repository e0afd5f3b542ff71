"""cafd-jax: Removing Adversarial Noise in Class Activation Feature Space, in JAX/Flax."""

from cafd_jax import cpu_flags as _cpu_flags

__version__ = "0.1.0"

_cpu_flags.apply()  # before any JAX computation: XLA reads XLA_FLAGS once
