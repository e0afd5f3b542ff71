"""Loss functions: per-example MSE, cross-entropy, relativistic average GAN losses (the CAF
distance is ``cam.caf_distance``)."""

import jax
import jax.numpy as jnp
import optax


def per_example_mse(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Mean squared difference over all but the batch axis: [B]."""
  diff = (a - b).reshape(a.shape[0], -1)
  return jnp.mean(diff * diff, axis=1)


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray,
                  label_smoothing: float = 0.0) -> jnp.ndarray:
  """Per-example softmax cross-entropy with integer labels: [B]; with ``label_smoothing`` s the
  target puts 1 - s on the label and s spread evenly over all classes."""
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype),
                                label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def relativistic_discriminator_loss(real_logits: jnp.ndarray, fake_logits: jnp.ndarray) -> jnp.ndarray:
  """RaGAN loss of the discriminator: real looks more real than the average fake, and back."""
  real_vs_fake = real_logits - jnp.mean(fake_logits)
  fake_vs_real = fake_logits - jnp.mean(real_logits)
  return (jnp.mean(optax.sigmoid_binary_cross_entropy(real_vs_fake, jnp.ones_like(real_vs_fake)))
          + jnp.mean(optax.sigmoid_binary_cross_entropy(fake_vs_real, jnp.zeros_like(fake_vs_real)))) / 2


def relativistic_generator_loss(real_logits: jnp.ndarray, fake_logits: jnp.ndarray) -> jnp.ndarray:
  """RaGAN loss of the generator (denoiser): the labels of the discriminator loss swapped."""
  return relativistic_discriminator_loss(fake_logits, real_logits)
