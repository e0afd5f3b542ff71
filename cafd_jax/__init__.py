"""cafd-jax: Removing Adversarial Noise in Class Activation Feature Space, in JAX/Flax."""

__version__ = "0.1.0"
