"""Auto-PGD (Croce & Hein 2020): APGD-CE, APGD-DLR and APGD-T, after torchattacks' APGD/APGDT.

One run starts at a random point on the eps-sphere (L-inf: uniform noise scaled to max-norm
eps), takes sign (L-inf) or normalised (L2) gradient steps of size 2 * eps with momentum 0.75,
and halves an example's step size at the checkpoints of ``checkpoint_schedule`` when fewer
than a fraction ``rho`` of the steps since the last checkpoint raised the loss, or when the
step size was kept and the best loss did not improve since the last checkpoint; a halving
also restarts the example from its best-loss point. A run returns, per example, its last
misclassified iterate (torchattacks' ``x_best_adv``); the attacks return x itself where no
run misclassified the example.
"""

from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from cafd_jax import losses
from cafd_jax.attacks import pgd_suite

LogitsFn = Callable[[jnp.ndarray], jnp.ndarray]
ObjectiveFn = Callable[[jnp.ndarray], jnp.ndarray]  # logits -> per-example loss [B]

_MOMENTUM = 0.75
_NORMS = ("linf", "l2")
_per_example = pgd_suite._per_example  # pylint: disable=protected-access


def checkpoint_schedule(steps: int) -> list[tuple[int, int]]:
  """(iteration index, window length) of each step-size check of a ``steps``-step run.

  The first window is 22% of the steps; each next one is 3% shorter, but at least 6% (all
  truncated to at least one step), which puts the checks at p_j * steps for
  p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).
  """
  window = max(int(0.22 * steps), 1)
  min_window = max(int(0.06 * steps), 1)
  decrease = max(int(0.03 * steps), 1)
  checks = []
  since_check = 0
  for i in range(steps):
    since_check += 1
    if since_check == window:
      checks.append((i, window))
      since_check = 0
      window = max(window - decrease, min_window)
  return checks


def dlr_loss(logits: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """Difference-of-logits-ratio loss: -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3 + 1e-12), [B].

  Where the true class ranks third the loss is 1 up to the 1e-12, and in float32 exactly 1;
  there the reference's gradient cancels to exactly 0, so a sign step stays put. The gradient
  is set to exactly 0 where the loss is exactly 1 to do the same, rather than follow rounding
  noise.
  """
  ordered = jnp.sort(logits, axis=-1)
  margin = pgd_suite.cw_margin_loss(logits, y)  # max_{i != y} z_i - z_y
  loss = margin / (ordered[:, -1] - ordered[:, -3] + 1e-12)
  return jnp.where(loss == 1.0, jax.lax.stop_gradient(loss), loss)


def targeted_dlr_loss(logits: jnp.ndarray, y: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
  """Targeted DLR loss: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12), [B]."""
  ordered = jnp.sort(logits, axis=-1)
  true_logit = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  target_logit = jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]
  scale = ordered[:, -1] - 0.5 * ordered[:, -3] - 0.5 * ordered[:, -4] + 1e-12
  return -(true_logit - target_logit) / scale


def _check_norm(norm: str) -> None:
  if norm not in _NORMS:
    raise ValueError(f"Unknown APGD norm {norm!r}; known: 'linf', 'l2'.")


def _random_start(key: jax.Array, x: jnp.ndarray, eps: float | jnp.ndarray,
                  norm: str) -> jnp.ndarray:
  """A random point at distance eps (before clipping to [0,1]), as in the reference."""
  if norm == "linf":
    t = 2.0 * jax.random.uniform(key, x.shape, x.dtype) - 1.0
    scale = jnp.max(jnp.abs(t).reshape(x.shape[0], -1), axis=1)
  else:
    t = jax.random.normal(key, x.shape, x.dtype)
    scale = pgd_suite.l2_norms(t) + 1e-12
  return jnp.clip(x + eps * t / _per_example(scale, x), 0.0, 1.0)


def _project_l2(x: jnp.ndarray, z: jnp.ndarray, eps: float | jnp.ndarray,
                slack: float) -> jnp.ndarray:
  """The reference's L2-ball projection of z around x (radius min(eps, norm + slack)), in [0,1]."""
  per = lambda v: _per_example(v, x)
  delta = z - x
  norms = pgd_suite.l2_norms(delta)
  return jnp.clip(x + delta / per(norms + 1e-12) * per(jnp.minimum(eps, norms + slack)), 0.0, 1.0)


def _momentum_step(x: jnp.ndarray, x_adv: jnp.ndarray, grad: jnp.ndarray, momentum: jnp.ndarray,
                   step_size: jnp.ndarray, a: jnp.ndarray, eps: float | jnp.ndarray,
                   norm: str) -> jnp.ndarray:
  """A gradient step projected to the ball and box, mixed with the last move (weight 1 - a)."""
  step_size = _per_example(step_size, x)
  if norm == "linf":
    project = lambda z: jnp.clip(jnp.minimum(jnp.maximum(z, x - eps), x + eps), 0.0, 1.0)
    x_1 = project(x_adv + step_size * jnp.sign(grad))
    return project(x_adv + (x_1 - x_adv) * a + momentum * (1.0 - a))
  grad_norms = _per_example(pgd_suite.l2_norms(grad), x)
  x_1 = _project_l2(x, x_adv + step_size * grad / (grad_norms + 1e-12), eps, 0.0)
  return _project_l2(x, x_adv + (x_1 - x_adv) * a + momentum * (1.0 - a), eps, 1e-12)


def _single_run(objective: ObjectiveFn, logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray,
                x_start: jnp.ndarray, *, eps: float | jnp.ndarray, steps: int, rho: float,
                norm: str) -> tuple[jnp.ndarray, jnp.ndarray]:
  """One APGD run from x_start: (last misclassified iterate, whether one was found) per example.

  Where none was found the first output holds x_start. Follows torchattacks'
  ``APGD.attack_single_run``, including its quirk that the first window compares the first
  step's loss with 0 (an unfilled slot of its loss history) when ``steps`` > 1.
  """
  per = lambda v: _per_example(v, x)

  def total_loss(z):
    logits = logits_fn(z)
    loss = objective(logits)
    return jnp.sum(loss), (loss, logits)

  loss_and_grad = jax.value_and_grad(total_loss, has_aux=True)

  def evaluate(z):
    (_, (loss, logits)), grad = loss_and_grad(z)
    return loss, grad, jnp.argmax(logits, axis=-1) == y

  # Scan index -1 only evaluates the start; 0, ..., steps - 1 are the steps. One loss-and-grad
  # in the graph keeps compilation short.
  is_check = np.zeros(steps + 1, bool)
  max_increases = np.zeros(steps + 1, np.int32)  # a check halves where increases <= window * rho
  for i, window in checkpoint_schedule(steps):
    is_check[i + 1] = True
    max_increases[i + 1] = int(np.floor(window * rho))

  batch = x.shape[0]
  loss_dtype = jax.eval_shape(lambda z: objective(logits_fn(z)), x_start).dtype
  init = dict(
      x_adv=x_start, x_old=x_start, grad=jnp.zeros_like(x),
      x_best=x_start, grad_best=jnp.zeros_like(x),
      loss_best=jnp.full((batch,), -jnp.inf, loss_dtype),
      x_best_adv=x_start, robust=jnp.ones((batch,), bool),
      step_size=jnp.full((batch,), 2.0, x.dtype) * eps,
      prev_loss=jnp.full((batch,), jnp.inf if steps == 1 else 0.0, loss_dtype),
      increases=jnp.zeros((batch,), jnp.int32),
      loss_best_last_check=jnp.zeros((batch,), loss_dtype),
      halved_last_check=jnp.ones((batch,), bool),
  )

  def step(c, inputs):
    i, check, max_incr = inputs
    start = i < 0
    a = jnp.where(i > 0, _MOMENTUM, 1.0).astype(x.dtype)
    x_adv = jnp.where(start, c["x_adv"], _momentum_step(
        x, c["x_adv"], c["grad"], c["x_adv"] - c["x_old"], c["step_size"], a, eps, norm))
    loss, grad, correct = evaluate(x_adv)
    c = dict(c, x_old=c["x_adv"], robust=c["robust"] & correct,
             x_best_adv=jnp.where(per(correct), c["x_best_adv"], x_adv))
    improved = start | (loss > c["loss_best"])
    c.update(x_best=jnp.where(per(improved), x_adv, c["x_best"]),
             grad_best=jnp.where(per(improved), grad, c["grad_best"]),
             loss_best=jnp.where(improved, loss, c["loss_best"]),
             increases=c["increases"] + (~start & (loss > c["prev_loss"])).astype(jnp.int32),
             prev_loss=jnp.where(start, c["prev_loss"], loss))
    # Checkpoint: halve (and restart from the best point) on oscillation or stagnation.
    oscillating = c["increases"] <= max_incr
    stagnating = ~c["halved_last_check"] & (c["loss_best_last_check"] >= c["loss_best"])
    halve = check & (oscillating | stagnating)
    c.update(step_size=jnp.where(halve, c["step_size"] / 2.0, c["step_size"]),
             x_adv=jnp.where(per(halve), c["x_best"], x_adv),
             grad=jnp.where(per(halve), c["grad_best"], grad),
             halved_last_check=jnp.where(check, halve, c["halved_last_check"]),
             loss_best_last_check=jnp.where(check | start, c["loss_best"],
                                            c["loss_best_last_check"]),
             increases=jnp.where(check, 0, c["increases"]))
    return c, None

  xs = (jnp.arange(-1, steps), jnp.asarray(is_check), jnp.asarray(max_increases))
  final, _ = jax.lax.scan(step, init, xs)
  return final["x_best_adv"], ~final["robust"]


def _run_keys(key: jax.Array, runs: int) -> jax.Array:
  """Run r starts from fold_in(key, r): adding runs leaves the earlier ones as they were."""
  return jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(runs))


def _attack_robust(run: Callable[[jax.Array, jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]],
                   logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray, keys: jax.Array,
                   run_args: jnp.ndarray) -> jnp.ndarray:
  """Runs ``run(key, arg)`` in turn; each keeps its adversarials among the still-robust examples.

  Examples misclassified from the start, and those no run fools, come back as x.
  """
  per = lambda v: _per_example(v, x)

  def body(carry, inputs):
    adv, robust = carry
    x_run, fooled = run(*inputs)
    adv = jnp.where(per(robust & fooled), x_run, adv)
    return (adv, robust & ~fooled), None

  robust = jnp.argmax(logits_fn(x), axis=-1) == y
  if len(keys) == 1:  # no loop around a single run: compiles faster
    (adv, _), _ = body((x, robust), (keys[0], run_args[0]))
  else:
    (adv, _), _ = jax.lax.scan(body, (x, robust), (keys, run_args))
  return jax.lax.stop_gradient(adv)


def apgd(logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray, key: jax.Array, *,
         eps: float = 8 / 255, steps: int = 100, restarts: int = 1, loss: str = "ce",
         rho: float = 0.75, norm: str = "linf") -> jnp.ndarray:
  """Untargeted APGD with the "ce" or "dlr" loss and ``restarts`` random restarts.

  A restart attacks only the examples no earlier run has fooled. Per example the result is
  the last misclassified iterate of the first fooling run, else x. ``steps``, ``restarts``,
  ``loss``, ``rho`` and ``norm`` are static; ``eps`` may be traced.
  """
  chex.assert_rank(x, 4)
  _check_norm(norm)
  if loss == "ce":
    objective = lambda logits: losses.cross_entropy(logits, y)
  elif loss == "dlr":
    objective = lambda logits: dlr_loss(logits, y)
  else:
    raise ValueError(f"Unknown APGD loss {loss!r}; known: 'ce', 'dlr'.")

  def run(run_key, _):
    return _single_run(objective, logits_fn, x, y, _random_start(run_key, x, eps, norm),
                       eps=eps, steps=steps, rho=rho, norm=norm)

  return _attack_robust(run, logits_fn, x, y, _run_keys(key, restarts),
                        jnp.zeros((restarts,), jnp.int32))


def apgd_ce(logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray, key: jax.Array, *,
            eps: float = 8 / 255, steps: int = 100, restarts: int = 1, rho: float = 0.75,
            norm: str = "linf") -> jnp.ndarray:
  """APGD-CE: ``apgd`` with the cross-entropy loss."""
  return apgd(logits_fn, x, y, key, eps=eps, steps=steps, restarts=restarts, loss="ce",
              rho=rho, norm=norm)


def apgd_dlr(logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray, key: jax.Array, *,
             eps: float = 8 / 255, steps: int = 100, restarts: int = 1, rho: float = 0.75,
             norm: str = "linf") -> jnp.ndarray:
  """APGD-DLR: ``apgd`` with the DLR loss (needs at least 3 classes)."""
  return apgd(logits_fn, x, y, key, eps=eps, steps=steps, restarts=restarts, loss="dlr",
              rho=rho, norm=norm)


def _targeted_run(logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray, target: jnp.ndarray,
                  key: jax.Array, *, eps: float | jnp.ndarray, steps: int, rho: float,
                  norm: str) -> tuple[jnp.ndarray, jnp.ndarray]:
  objective = lambda logits: targeted_dlr_loss(logits, y, target)
  return _single_run(objective, logits_fn, x, y, _random_start(key, x, eps, norm),
                     eps=eps, steps=steps, rho=rho, norm=norm)


def apgd_targeted_once(logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray, target: jnp.ndarray,
                       key: jax.Array, *, eps: float = 8 / 255, steps: int = 100,
                       rho: float = 0.75, norm: str = "linf") -> jnp.ndarray:
  """One APGD run on the targeted DLR loss towards ``target`` [B], on every example.

  Success means misclassification (prediction != y), as in the reference: per example the
  last misclassified iterate, else x.
  """
  chex.assert_rank(x, 4)
  _check_norm(norm)
  x_run, fooled = _targeted_run(logits_fn, x, y, target, key, eps=eps, steps=steps, rho=rho,
                                norm=norm)
  return jax.lax.stop_gradient(jnp.where(_per_example(fooled, x), x_run, x))


def apgd_targeted(logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray, key: jax.Array, *,
                  eps: float = 8 / 255, steps: int = 100, restarts: int = 1,
                  n_target_classes: int = 9, rho: float = 0.75,
                  norm: str = "linf") -> jnp.ndarray:
  """APGD-T: targeted-DLR runs towards the 2nd, ..., (n_target_classes + 1)-th highest clean logit.

  Each target class gets ``restarts`` runs; every run attacks only the examples still
  correctly classified. Per example the last misclassified iterate of the first fooling run,
  else x. ``steps``, ``restarts``, ``n_target_classes``, ``rho`` and ``norm`` are static.
  """
  chex.assert_rank(x, 4)
  _check_norm(norm)
  clean_logits = logits_fn(x)
  num_classes = clean_logits.shape[-1]
  if not 1 <= n_target_classes <= num_classes - 1:
    raise ValueError(f"n_target_classes={n_target_classes} must be in [1, {num_classes - 1}].")
  by_logit = jnp.argsort(clean_logits, axis=-1)  # ascending: the k-th highest at -k

  def run(run_key, rank):
    target = jnp.take(by_logit, num_classes - rank, axis=1)
    return _targeted_run(logits_fn, x, y, target, run_key, eps=eps, steps=steps, rho=rho,
                         norm=norm)

  ranks = np.repeat(np.arange(2, n_target_classes + 2, dtype=np.int32), restarts)
  return _attack_robust(run, logits_fn, x, y, _run_keys(key, len(ranks)), jnp.asarray(ranks))
