"""Spatially transformed adversarial examples (stAdv, Xiao et al. ICLR 2018), untargeted.

The attack optimises a per-pixel flow field f of shape [B, H, W, 2], in pixels, with
f[..., 0] the row (downwards) and f[..., 1] the column (rightwards) displacement, so that
the bilinearly resampled image x_adv(p) = x(p + f(p)) is misclassified. Per example it
minimises

  max(z_y - max_{i != y} z_i, -kappa) + tau * smoothness(f),

with one of two smoothness penalties:

* "advertorch" (default): the one of advertorch's SpatialTransformAttack, which the CAFD code
  runs for its STA results: ||vertical differences of f||_2 + ||horizontal differences||_2,
  each norm over the whole image and both components, with f in the [-1, 1] grid units of
  ``affine_grid`` (a pixel is 2/H vertically, 2/W horizontally); CAFD uses tau = 1.
* "paper": Eq. (4) of the paper, sum_p sum_{q in N(p)} sqrt(||f(p) - f(q)||^2 + eps) in
  pixels, N(p) the up to four horizontal and vertical neighbours inside the image (each pair
  counts twice); the paper uses tau = 0.05.

The default optimiser is L-BFGS, as in the paper and the CAFD code (scipy's L-BFGS-B, 100
iterations per search step); Adam is available too. Unlike advertorch, sampling clamps to the
border (advertorch pads with zeros and bounds the sampling grid to [-1, 1]), each example is
optimised on its own (scipy optimises the summed batch loss), and a failed example keeps its
last warp (advertorch returns zeros).
"""

from typing import Callable

import chex
import jax
import jax.numpy as jnp
import optax

from cafd_jax.attacks import pgd_suite

LogitsFn = Callable[[jnp.ndarray], jnp.ndarray]

_FLOW_EPS = 1e-8  # inside the square roots of the flow loss
_ARMIJO = 1e-4  # sufficient-decrease constant of the line search
_CURVATURE_EPS = 1e-7  # L-BFGS keeps a pair (s, y) only if s.y > this * y.y


def _dot(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Per-example inner product over all but the batch axis: [B]."""
  return jnp.sum(a * b, axis=tuple(range(1, a.ndim)))


def warp(x: jnp.ndarray, flow: jnp.ndarray) -> jnp.ndarray:
  """Bilinear resampling x_adv[b, i, j] = x[b, i + flow[b, i, j, 0], j + flow[b, i, j, 1]].

  Sampling positions outside the image take the nearest border value (border clamping). The
  result is differentiable in x and flow; a zero flow returns x exactly.

  Args:
    x: images [B, H, W, C].
    flow: displacements in pixels [B, H, W, 2], (row, column) order.

  Returns:
    The warped images [B, H, W, C].
  """
  chex.assert_rank(x, 4)
  chex.assert_shape(flow, x.shape[:3] + (2,))
  batch, height, width, channels = x.shape
  rows = jnp.arange(height, dtype=flow.dtype)[:, None] + flow[..., 0]
  cols = jnp.arange(width, dtype=flow.dtype)[None, :] + flow[..., 1]
  row0 = jnp.floor(rows)
  col0 = jnp.floor(cols)
  row_frac = (rows - row0)[..., None]
  col_frac = (cols - col0)[..., None]
  row0 = row0.astype(jnp.int32)
  col0 = col0.astype(jnp.int32)
  flat = x.reshape(batch, height * width, channels)

  def corner(r, c):
    index = jnp.clip(r, 0, height - 1) * width + jnp.clip(c, 0, width - 1)
    values = jnp.take_along_axis(flat, index.reshape(batch, -1, 1), axis=1)
    return values.reshape(x.shape)

  top = (1.0 - col_frac) * corner(row0, col0) + col_frac * corner(row0, col0 + 1)
  bottom = (1.0 - col_frac) * corner(row0 + 1, col0) + col_frac * corner(row0 + 1, col0 + 1)
  return (1.0 - row_frac) * top + row_frac * bottom


def flow_loss(flow: jnp.ndarray, eps: float = _FLOW_EPS) -> jnp.ndarray:
  """The paper's smoothness: sum over pixels and 4-neighbours of sqrt(||df||^2 + eps): [B].

  The flow is in pixels; each unordered neighbouring pair counts twice, as in Eq. (4).
  """
  chex.assert_rank(flow, 4)
  vertical = jnp.sum(jnp.square(flow[:, 1:] - flow[:, :-1]), axis=-1)
  horizontal = jnp.sum(jnp.square(flow[:, :, 1:] - flow[:, :, :-1]), axis=-1)
  return 2.0 * (jnp.sum(jnp.sqrt(vertical + eps), axis=(1, 2)) +
                jnp.sum(jnp.sqrt(horizontal + eps), axis=(1, 2)))


def flow_l2_loss(flow: jnp.ndarray, eps: float = _FLOW_EPS) -> jnp.ndarray:
  """advertorch's smoothness: ||vertical differences||_2 + ||horizontal ones||_2: [B].

  Each norm runs over the image and both flow components, measured in [-1, 1] grid units
  (the flow's rows times 2/H, its columns times 2/W); eps sits inside each square root.
  """
  chex.assert_rank(flow, 4)
  height, width = flow.shape[1:3]
  grid = flow * jnp.asarray([2.0 / height, 2.0 / width], flow.dtype)
  vertical = jnp.sum(jnp.square(grid[:, 1:] - grid[:, :-1]), axis=(1, 2, 3))
  horizontal = jnp.sum(jnp.square(grid[:, :, 1:] - grid[:, :, :-1]), axis=(1, 2, 3))
  return jnp.sqrt(vertical + eps) + jnp.sqrt(horizontal + eps)


_SMOOTHNESS = {"advertorch": (flow_l2_loss, 1.0), "paper": (flow_loss, 0.05)}  # (loss, tau)


def _fools(logits: jnp.ndarray, y: jnp.ndarray, kappa: float | jnp.ndarray) -> jnp.ndarray:
  """Misclassified even after the true logit is raised by kappa."""
  boosted = logits + kappa * jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype)
  return jnp.argmax(boosted, axis=-1) != y


def _project(flow: jnp.ndarray, max_flow: float | jnp.ndarray | None) -> jnp.ndarray:
  """Clips each pixel's displacement to length max_flow (no-op when None)."""
  if max_flow is None:
    return flow
  lengths = jnp.sqrt(jnp.sum(jnp.square(flow), axis=-1, keepdims=True))
  return flow * jnp.minimum(1.0, max_flow / jnp.maximum(lengths, 1e-12))


def _two_loop(grad: jnp.ndarray, s_mem: jnp.ndarray, y_mem: jnp.ndarray, rho: jnp.ndarray,
              gamma: jnp.ndarray) -> jnp.ndarray:
  """L-BFGS two-loop recursion per example: H grad with H0 = gamma * I.

  Memory slots run oldest (index 0) to newest; a slot with rho == 0 is empty.
  """
  expand = lambda v: pgd_suite._per_example(v, grad)  # pylint: disable=protected-access
  history = s_mem.shape[0]
  q = grad
  alphas = []
  for j in reversed(range(history)):
    alpha = rho[j] * _dot(s_mem[j], q)
    q = q - expand(alpha) * y_mem[j]
    alphas.append(alpha)
  r = expand(gamma) * q
  for j, alpha in zip(range(history), reversed(alphas)):
    beta = rho[j] * _dot(y_mem[j], r)
    r = r + expand(alpha - beta) * s_mem[j]
  return r


def _lbfgs(value_and_grad: Callable, flow0: jnp.ndarray, track: Callable, best: tuple, *,
           steps: int, search_steps: int, history: int, max_halvings: int,
           max_flow: float | jnp.ndarray | None) -> tuple[jnp.ndarray, tuple]:
  """Per-example L-BFGS from flow0; returns (last flow, best)."""
  batch = flow0.shape[0]
  expand = lambda v: pgd_suite._per_example(v, flow0)  # pylint: disable=protected-access
  (_, (loss0, logits0)), grad0 = value_and_grad(flow0)
  best = track(best, flow0, logits0)

  def step(i, carry):
    flow, loss, grad, step_size, (s_mem, y_mem, rho, gamma), best = carry
    # Each search step restarts L-BFGS (empty memory, unit step) from the current flow.
    restart = i % steps == 0
    rho = jnp.where(restart, 0.0, rho)
    step_size = jnp.where(restart, 1.0, step_size)
    direction = -_two_loop(grad, s_mem, y_mem, rho, gamma)
    usable = jnp.any(rho > 0, axis=0) & (_dot(direction, grad) < 0)
    steepest = -grad / expand(jnp.maximum(pgd_suite.l2_norms(grad), 1e-12))  # unit length
    direction = jnp.where(expand(usable), direction, steepest)

    candidate = _project(flow + expand(step_size) * direction, max_flow)
    (_, (c_loss, c_logits)), c_grad = value_and_grad(candidate)
    best = track(best, candidate, c_logits)  # every evaluated flow may be kept
    accept = c_loss <= loss + _ARMIJO * _dot(grad, candidate - flow)

    s = candidate - flow
    y_diff = c_grad - grad
    sy = _dot(s, y_diff)
    yy = _dot(y_diff, y_diff)
    keep = accept & (sy > _CURVATURE_EPS * yy) & (sy > 0)  # else an empty slot (rho = 0)
    new_rho = jnp.where(keep, 1.0 / jnp.where(keep, sy, 1.0), 0.0)

    def push(memory, new):
      accepted = accept.reshape((1, -1) + (1,) * (new.ndim - 1))
      return jnp.where(accepted, jnp.concatenate([memory[1:], new[None]]), memory)

    s_mem, y_mem, rho = push(s_mem, s), push(y_mem, y_diff), push(rho, new_rho)
    gamma = jnp.where(keep, sy / jnp.where(keep, yy, 1.0), gamma)
    # The backtracking line search is spread over iterations, one evaluation each: a rejected
    # trial halves the next step; after max_halvings the memory is dropped.
    step_size = jnp.where(accept, jnp.minimum(2.0 * step_size, 1.0), step_size / 2.0)
    failed = step_size < 0.5**max_halvings
    rho = jnp.where(failed[None], 0.0, rho)
    step_size = jnp.where(failed, 1.0, step_size)
    flow = jnp.where(expand(accept), candidate, flow)
    loss = jnp.where(accept, c_loss, loss)
    grad = jnp.where(expand(accept), c_grad, grad)
    return flow, loss, grad, step_size, (s_mem, y_mem, rho, gamma), best

  memory = (jnp.zeros((history,) + flow0.shape, flow0.dtype),
            jnp.zeros((history,) + flow0.shape, flow0.dtype),
            jnp.zeros((history, batch), flow0.dtype), jnp.ones((batch,), flow0.dtype))
  carry = (flow0, loss0, grad0, jnp.ones((batch,), flow0.dtype), memory, best)
  flow, *_, best = jax.lax.fori_loop(0, steps * search_steps, step, carry)
  return flow, best


def spatial_transform_flow(logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray,
                           key: jax.Array, *, steps: int = 100, tau: float | None = None,
                           kappa: float = 0.0, max_flow: float | None = None,
                           smoothness: str = "advertorch", optimizer: str = "lbfgs",
                           lr: float = 0.01, search_steps: int = 1, history: int = 10,
                           max_halvings: int = 20) -> jnp.ndarray:
  """The flow field [B, H, W, 2] (pixels) of ``spatial_transform``, same arguments."""
  del key  # the flow starts at zero
  chex.assert_rank(x, 4)
  if smoothness not in _SMOOTHNESS:
    raise ValueError(f"Unknown stAdv smoothness {smoothness!r}; known: 'advertorch', 'paper'.")
  if optimizer not in ("lbfgs", "adam"):
    raise ValueError(f"Unknown stAdv optimizer {optimizer!r}; known: 'adam', 'lbfgs'.")
  penalty, default_tau = _SMOOTHNESS[smoothness]
  tau = default_tau if tau is None else tau
  batch, height, width, _ = x.shape
  flow0 = jnp.zeros((batch, height, width, 2), x.dtype)
  expand = lambda v: pgd_suite._per_example(v, flow0)  # pylint: disable=protected-access

  def objective(flow):
    logits = logits_fn(warp(x, flow))
    per_example = (jnp.maximum(-pgd_suite.cw_margin_loss(logits, y), -kappa) +
                   tau * penalty(flow))
    return jnp.sum(per_example), (per_example, logits)

  def track(best, flow, logits):
    """Keeps per example the fooling flow of smallest L2 norm."""
    best_flow, best_norm = best
    norms = pgd_suite.l2_norms(flow)
    improved = _fools(logits, y, kappa) & (norms < best_norm)
    return jnp.where(expand(improved), flow, best_flow), jnp.where(improved, norms, best_norm)

  best = (flow0, jnp.full((batch,), jnp.inf, x.dtype))
  if optimizer == "adam":
    tx = optax.adam(lr)

    def adam_step(_, carry):
      flow, opt_state, best = carry
      grad, (_, logits) = jax.grad(objective, has_aux=True)(flow)
      best = track(best, flow, logits)
      updates, opt_state = tx.update(grad, opt_state, flow)
      return _project(optax.apply_updates(flow, updates), max_flow), opt_state, best

    flow, _, best = jax.lax.fori_loop(0, steps * search_steps, adam_step,
                                      (flow0, tx.init(flow0), best))
    best = track(best, flow, logits_fn(warp(x, flow)))
  else:
    flow, best = _lbfgs(jax.value_and_grad(objective, has_aux=True), flow0, track, best,
                        steps=max(steps, 1), search_steps=search_steps if steps else 0,
                        history=history, max_halvings=max_halvings, max_flow=max_flow)
  best_flow, best_norm = best
  return jax.lax.stop_gradient(jnp.where(expand(jnp.isfinite(best_norm)), best_flow, flow))


def spatial_transform(logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray, key: jax.Array,
                      *, steps: int = 100, tau: float | None = None, kappa: float = 0.0,
                      max_flow: float | None = None, smoothness: str = "advertorch",
                      optimizer: str = "lbfgs", lr: float = 0.01, search_steps: int = 1,
                      history: int = 10, max_halvings: int = 20) -> jnp.ndarray:
  """stAdv ("STA"): per example the fooling warp of smallest flow norm, else the last one.

  Minimises max(z_y - max_{i != y} z_i, -kappa) + tau * smoothness(f) over the flow f from
  f = 0 (see the module docstring); ``tau=None`` takes the variant's reference weight (1 for
  "advertorch", 0.05 for "paper"). Optimisers, for ``steps`` iterations:

  * "lbfgs" (default): per-example L-BFGS with ``history`` curvature pairs and a unit-length
    first step. Each iteration evaluates one trial point (one forward and backward pass);
    an Armijo-rejected trial is not taken and halves the next step, so the backtracking line
    search spreads over iterations; after ``max_halvings`` halvings the memory is dropped.
    The run is repeated ``search_steps`` times from the flow reached, each time with an
    empty memory (CAFD's advertorch call: 20 search steps of 100 L-BFGS-B iterations).
    ``lr`` is unused.
  * "adam": Adam with learning rate ``lr`` (pixels per step), ``steps * search_steps``
    steps.

  Every evaluated flow is checked; the result is x warped by the smallest-L2 flow that fooled
  the model (argmax of the logits with the true one raised by kappa is not y), or by the last
  flow where none did. ``max_flow``, if given, clips each pixel's displacement to that length
  in pixels after every step. ``key`` is unused: the attack is deterministic, and
  ``steps=0`` returns x.
  """
  flow = spatial_transform_flow(logits_fn, x, y, key, steps=steps, tau=tau, kappa=kappa,
                                max_flow=max_flow, smoothness=smoothness, optimizer=optimizer,
                                lr=lr, search_steps=search_steps, history=history,
                                max_halvings=max_halvings)
  return jax.lax.stop_gradient(jnp.clip(warp(x, flow), 0.0, 1.0))
