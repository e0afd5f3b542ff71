"""AutoAttack (Croce & Hein 2020): a fixed ensemble; an example is robust only if it survives all.

"standard" (L-inf) runs APGD-CE, APGD-T (targeted DLR), FAB-T and Square in that order, each
on the examples that are still classified correctly. In a compiled program shapes are fixed,
so every stage runs on the whole batch and its result is kept only for still-robust examples;
a stage is skipped (``lax.cond``) once no example of the batch is robust.
"""

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from cafd_jax.attacks import apgd, fab, square

LogitsFn = Callable[[jnp.ndarray], jnp.ndarray]

STAGES = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square"),
    "fast": ("apgd-ce", "apgd-t"),
}


def _stage_fn(stage: str, *, eps, steps: int, n_target_classes: int, square_queries: int,
              restarts: int) -> Callable:
  """``fn(logits_fn, x, y, key) -> x_adv`` for one stage, with AutoAttack's settings."""
  if stage == "apgd-ce":
    return lambda f, x, y, k: apgd.apgd(f, x, y, k, eps=eps, steps=steps, restarts=restarts,
                                        loss="ce")
  if stage == "apgd-dlr":
    return lambda f, x, y, k: apgd.apgd(f, x, y, k, eps=eps, steps=steps, restarts=restarts,
                                        loss="dlr")
  if stage == "apgd-t":
    return lambda f, x, y, k: apgd.apgd_targeted(f, x, y, k, eps=eps, steps=steps,
                                                 restarts=restarts,
                                                 n_target_classes=n_target_classes)
  if stage == "fab-t":
    return lambda f, x, y, k: fab.fab_targeted(f, x, y, k, eps=eps, steps=steps,
                                               restarts=restarts,
                                               n_target_classes=n_target_classes)
  if stage == "square":
    return lambda f, x, y, k: square.square_linf(f, x, y, k, eps=eps, n_queries=square_queries,
                                                 restarts=restarts)
  raise ValueError(f"Unknown AutoAttack stage {stage!r}")


def autoattack(logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray, key: jax.Array, *,
               eps: float = 8 / 255, version: str = "standard", steps: int = 100,
               n_target_classes: int = 9, square_queries: int = 5000,
               restarts: int = 1) -> jnp.ndarray:
  """L-inf AutoAttack; per example the first stage's adversarial example, else x.

  Defaults are those of AutoAttack "standard": 100 iterations for APGD and FAB, 9 target
  classes for APGD-T and FAB-T, 5000 Square queries, one restart each. ``version`` "fast"
  (APGD-CE + APGD-T) and "plus" (adds APGD-DLR) trade strength for time.
  """
  chex.assert_rank(x, 4)
  if version not in STAGES:
    raise ValueError(f"Unknown AutoAttack version {version!r}; known: {', '.join(STAGES)}")
  stages = STAGES[version]
  keys = jax.random.split(key, len(stages))
  robust = jnp.argmax(logits_fn(x), axis=-1) == y
  x_adv = x
  for stage, stage_key in zip(stages, keys):
    run = _stage_fn(stage, eps=eps, steps=steps, n_target_classes=n_target_classes,
                    square_queries=square_queries, restarts=restarts)

    def attack_stage(carry, run=run, stage_key=stage_key):
      x_adv, robust = carry
      candidate = run(logits_fn, x, y, stage_key)
      fooled = (jnp.argmax(logits_fn(candidate), axis=-1) != y) & robust
      x_adv = jnp.where(fooled[:, None, None, None], candidate, x_adv)
      return x_adv, robust & ~fooled

    x_adv, robust = jax.lax.cond(jnp.any(robust), attack_stage, lambda carry: carry,
                                 (x_adv, robust))
  return jax.lax.stop_gradient(x_adv)
