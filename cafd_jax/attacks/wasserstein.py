"""Wasserstein PGD with projected Sinkhorn (Wong, Schmidt & Kolter, ICML 2019).

An image is a mass distribution: it is divided by its total mass (all pixels and channels of
the example, as in the reference code), and mass moves only inside its channel, at most
``kernel_size // 2`` pixels along each axis, at cost ``||offset||_2 ** p``. Moving a fraction
m of the image's mass by one pixel costs m, so eps is (mass fraction) x (pixel distance) ** p.
Transport never crosses channels, so the projection keeps every channel's mass.

The projection of w onto {z : W(x, z) <= eps} solves the entropy-regularised problem
``min_{z, P >= 0} 0.5 ||z - w||^2 + (1 / lambda) sum P log P`` subject to ``P 1 = x``,
``P^T 1 = z`` and ``<C, P> <= eps`` through its dual, by block updates as the reference:
alpha (row marginals, closed form), beta (column marginals, a Lambert W) and one backtracked
Newton step on the multiplier psi of the cost constraint. The plan is
``P_ij = exp(-alpha_i - psi C_ij - 1 - beta_j)`` and the projection ``z = w + beta / lambda``.
The local transport operator is a per-example k x k window sum (k * k shifted multiply-adds,
i.e. a depthwise convolution whose kernel exp(-psi C - 1) differs per example); exp(-beta)
is kept rescaled by its per-example max, and the Lambert W is solved in log space, so
nothing overflows where the reference's plain exponentials can.
"""

import math
from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from cafd_jax import losses

LogitsFn = Callable[[jnp.ndarray], jnp.ndarray]

_LAMBERT_NEWTON_STEPS = 4  # float32-exact from the softplus start over s in [-80, 120]
_BACKTRACK_HALVINGS = 7  # the reference halves the Newton step while t > 1e-2: 1 ... 1/128
_LOG_TINY = -80.0  # exp(-80) ~ 2e-35: an empty window's Lambert-W argument


def local_cost(kernel_size: int = 5, p: float = 2) -> np.ndarray:
  """Cost of moving unit mass by each offset of a k x k window: ``||offset||_2 ** p``, [k, k]."""
  if kernel_size < 1 or kernel_size % 2 != 1:
    raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}.")
  offsets = np.arange(kernel_size) - kernel_size // 2
  squared = offsets[:, None] ** 2 + offsets[None, :] ** 2
  return (squared.astype(np.float64) ** (p / 2)).astype(np.float32)


def _window_sums(v: jnp.ndarray, weights: tuple[jnp.ndarray, ...],
                 kernel_size: int) -> tuple[jnp.ndarray, ...]:
  """Per-example weighted k x k window sums of v (zero outside the image), one per weight.

  Each weight is [B, k * k], a kernel per example, shared by the channels: the local
  transport operator ``(K v)_i = sum_j K_ij v_j`` with j in the window of i (C symmetric).
  """
  radius = kernel_size // 2
  height, width = v.shape[1], v.shape[2]
  padded = jnp.pad(v, ((0, 0), (radius, radius), (radius, radius), (0, 0)))
  sums = [jnp.zeros_like(v) for _ in weights]
  for offset in range(kernel_size * kernel_size):
    dy, dx = divmod(offset, kernel_size)
    neighbour = padded[:, dy:dy + height, dx:dx + width, :]
    for j, weight in enumerate(weights):
      sums[j] = sums[j] + weight[:, offset, None, None, None] * neighbour
  return tuple(sums)


def _max_per_example(u: jnp.ndarray) -> jnp.ndarray:
  """Max over all but the batch axis, 0 where all are -inf, shaped [B, 1, 1, 1]."""
  top = jnp.max(u, axis=(1, 2, 3), keepdims=True)
  return jnp.where(jnp.isfinite(top), top, 0.0)


def _lambertw_exp(s: jnp.ndarray) -> jnp.ndarray:
  """Principal Lambert W of exp(s), without forming exp(s): solves w + log w = s for w > 0.

  Newton on the concave w + log w - s, started below exp(1 + s), stays positive and
  converges monotonically after the first step.
  """
  s = jnp.maximum(s, _LOG_TINY)
  w = jax.nn.softplus(s)
  for _ in range(_LAMBERT_NEWTON_STEPS):
    w = w * (1.0 + s - jnp.log(w)) / (1.0 + w)
  return w


def _projected_sinkhorn(x: jnp.ndarray, w: jnp.ndarray, eps: float | jnp.ndarray, *,
                        kernel_size: int, p: float, regularization: float,
                        iters: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The projection and the transport cost of its plan (exact column marginals z), [B].

  exp(-beta) is held as ``e_beta * exp(shift)`` with a per-example shift (its max), so the
  window sums neither overflow nor underflow for images of ordinary contrast.
  """
  lam = regularization
  batch = x.shape[0]
  cost = jnp.asarray(local_cost(kernel_size, p).reshape(1, -1))
  eps = jnp.broadcast_to(jnp.asarray(eps, x.dtype), (batch,))
  sum_examples = lambda v: jnp.sum(v, axis=(1, 2, 3))

  def scaled_exp(u):
    shift = _max_per_example(u)
    return jnp.exp(u - shift), shift

  def rescaled_sum(scale, v):
    # An example without mass (an all-black image) has e_alpha = 0, and its scale may be
    # inf (its beta follows lam * w alone): its plan, and so the sum, is 0, not inf * 0.
    total = sum_examples(v)
    return jnp.where(total > 0.0, scale * total, 0.0)

  def iteration(_, state):
    beta, psi, _, _ = state
    kernel = jnp.exp(-psi[:, None] * cost - 1.0)  # K = exp(-psi C - 1), [B, k * k]
    e_beta, shift = scaled_exp(-beta)
    # alpha: the rows of the plan sum to x; e_alpha = exp(-alpha + shift) = x / (K e_beta).
    k_beta, = _window_sums(e_beta, (kernel,), kernel_size)
    e_alpha = jnp.where(x > 0.0, x / jnp.maximum(k_beta, 1e-38), 0.0)
    # beta: the columns sum to w + beta / lambda, i.e. beta = W(lam e^{lam w} a) - lam w.
    k_alpha, = _window_sums(e_alpha, (kernel,), kernel_size)
    log_a = jnp.log(k_alpha) - shift
    lambert = _lambertw_exp(math.log(lam) + lam * w + log_a)
    beta = lambert - lam * w
    # psi: one Newton step on the dual, backtracked to stay >= 0, then clamped at 0.
    e_beta, new_shift = scaled_exp(-beta)
    c_beta, c2_beta = _window_sums(e_beta, (kernel * cost, kernel * cost * cost), kernel_size)
    scale = jnp.exp(new_shift - shift)[:, 0, 0, 0]
    plan_cost = rescaled_sum(scale, e_alpha * c_beta)
    dpsi = plan_cost - eps
    ddpsi = -rescaled_sum(scale, e_alpha * c2_beta)
    delta = dpsi / jnp.minimum(ddpsi, -1e-30)
    step = jnp.ones_like(psi)
    for _ in range(_BACKTRACK_HALVINGS):
      step = jnp.where(psi - step * delta < 0.0, step / 2.0, step)
    psi = jnp.maximum(psi - step * delta, 0.0)
    return beta, psi, lambert / lam, plan_cost  # z = w + beta / lambda, without cancelling

  init = (jnp.full_like(x, -math.log(math.prod(x.shape[1:]))), jnp.ones((batch,), x.dtype), w,
          jnp.zeros((batch,), x.dtype))
  _, _, z, plan_cost = jax.lax.fori_loop(0, iters, iteration, init)
  return z, plan_cost


def projected_sinkhorn(x: jnp.ndarray, w: jnp.ndarray, eps: float | jnp.ndarray, *,
                       kernel_size: int = 5, p: float = 2, regularization: float = 3000.0,
                       iters: int = 50, return_cost: bool = False
                       ) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
  """Approximate projection of w onto the local Wasserstein ball {z : W(x, z) <= eps}.

  Args:
    x: the ball's centre, NHWC mass distributions: nonnegative, each example summing to 1
      (the attack divides images by their total mass; ``regularization`` is tuned for that).
    w: the points to project, NHWC like x (any sign).
    eps: radius, a scalar or one per example [B], in units of (mass fraction) x (pixel
      distance) ** p.
    kernel_size: odd width of the square window mass may move within.
    p: the cost of moving unit mass by offset d is ``||d||_2 ** p``.
    regularization: lambda, the inverse weight of the plan's entropy.
    iters: number of dual block updates (alpha, beta, Newton step on psi). The reference
      stops when its objective settles (it is evaluated with swapped arguments), after
      15-40 updates on CIFAR-10 images; 50 come within ~1e-4 of the fixed point there.
    return_cost: also return the transport cost of the plan behind z (its columns sum to z
      exactly, its rows to x once converged), [B].

  Returns:
    z, NHWC like w; with ``return_cost``, (z, plan cost [B]).
  """
  chex.assert_rank(x, 4)
  chex.assert_equal_shape((x, w))
  z, plan_cost = _projected_sinkhorn(x, w, eps, kernel_size=kernel_size, p=p,
                                     regularization=regularization, iters=iters)
  z, plan_cost = jax.lax.stop_gradient((z, plan_cost))
  return (z, plan_cost) if return_cost else z


def wasserstein(logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray, key: jax.Array, *,
                eps: float = 0.001, steps: int = 400, alpha: float = 0.1, kernel_size: int = 5,
                p: float = 2, regularization: float = 3000.0, sinkhorn_iters: int = 50,
                eps_growth: float = 1.17, eps_growth_every: int = 10,
                max_eps: float = float("inf")) -> jnp.ndarray:
  """Untargeted Wasserstein PGD (Wong et al. 2019), defaults of their CIFAR-10 attack script.

  Each step adds ``alpha * sign(grad CE)`` to the examples not yet misclassified, projects
  them onto the local Wasserstein ball of radius eps around x (``projected_sinkhorn`` on the
  images divided by x's total mass, so eps is a fraction of the image's mass times a pixel
  distance ** p) and clips to [0, 1]. After every ``eps_growth_every`` steps the radius of
  each example still classified correctly grows by ``eps_growth``, at most to ``max_eps``;
  ``eps_growth=1`` gives a fixed-budget attack. An example stops changing once misclassified,
  so the result is per example the first adversarial iterate (x itself if x is already
  misclassified), else the last. The reference runs ``maxiters=400`` steps with alpha 0.1,
  p 2, 5x5 windows, regularization 3000 (its CIFAR-10 script; the library default is 1000)
  and up to 400 Sinkhorn updates stopped early by an objective test (15-40 on CIFAR-10);
  ``sinkhorn_iters`` fixed updates replace that. ``key`` is unused (deterministic attack).
  """
  del key
  chex.assert_rank(x, 4)
  if steps == 0:
    return jax.lax.stop_gradient(x)
  batch = x.shape[0]
  mass = jnp.maximum(jnp.sum(x, axis=(1, 2, 3), keepdims=True), 1e-12)
  centre = x / mass

  def loss_and_logits(z):
    logits = logits_fn(z)
    return jnp.sum(losses.cross_entropy(logits, y)), logits

  grad_fn = jax.grad(loss_and_logits, has_aux=True)

  def body(state):
    i, x_adv, radius, _ = state
    grad, logits = grad_fn(x_adv)
    fooled = jnp.argmax(logits, axis=-1) != y
    grow = (i > 0) & (i % eps_growth_every == 0) & ~fooled
    radius = jnp.where(grow, jnp.minimum(radius * eps_growth, max_eps), radius)
    stepped = x_adv + alpha * jnp.sign(grad)
    projected = projected_sinkhorn(centre, stepped / mass, radius, kernel_size=kernel_size, p=p,
                                   regularization=regularization, iters=sinkhorn_iters) * mass
    frozen = fooled[:, None, None, None]
    x_adv = jnp.clip(jnp.where(frozen, x_adv, projected), 0.0, 1.0)
    return i + 1, x_adv, radius, jnp.all(fooled)

  def cond(state):
    i, _, _, all_fooled = state
    return (i < steps) & ~all_fooled

  radius = jnp.broadcast_to(jnp.asarray(eps, x.dtype), (batch,))
  init = (jnp.asarray(0), x, radius, jnp.asarray(False))
  _, x_adv, _, _ = jax.lax.while_loop(cond, body, init)
  return jax.lax.stop_gradient(x_adv)
