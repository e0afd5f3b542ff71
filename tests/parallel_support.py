"""Runs in a subprocess with 8 virtual CPU devices (tests/test_parallel.py): trains the tiny
classifier with ``loop.fit`` on meshes of 1 and 8 devices and writes the states it compares.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/parallel_support.py OUT_DIR
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cafd_jax import data, factory, parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from cafd_jax.train import classifier, loop  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position

BATCH = 32


def _leaves(tree) -> list[tuple[str, np.ndarray]]:
  """(path, value) of every leaf, in a fixed order."""
  return [(jax.tree_util.keystr(path), np.asarray(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _state(num_examples, dtype="float32"):
  config = tiny.get_config()
  config.model.width = 0.5
  return factory.classifier_state(config, 10, jax.random.key(0), num_examples // BATCH,
                                  jnp.dtype(dtype))


def _fit(directory, mesh, num_epochs, fsdp=False, dtype="float32", accumulation_steps=1,
         images=None, labels=None, augment=True, batch_size=BATCH):
  dataset = data.make_synthetic(96, seed=4)
  images = dataset.images if images is None else images
  labels = dataset.labels if labels is None else labels
  return loop.fit(stage="test", state=_state(len(images), dtype),
                  step_fn=classifier.make_step_fn(augment, accumulation_steps),
                  arrays=(images, labels), batch_size=batch_size, num_epochs=num_epochs,
                  seed=0, key=jax.random.key(1), checkpoint_dir=directory, workdir=None,
                  mesh=mesh, fsdp=fsdp)


def _step_losses(mesh, num_steps=3) -> list[float]:
  """The loss of each of the first steps, with the step compiled for ``mesh``."""
  dataset = data.make_synthetic(96, seed=4)
  state = _state(len(dataset))
  compiled, shardings = loop.compile_step(classifier.make_step_fn(True), state, mesh)
  state = parallel.place_state(state, shardings)
  losses = []
  for step in range(num_steps):
    rows = slice(step * BATCH, (step + 1) * BATCH)
    batch = parallel.shard_batch((dataset.images[rows], dataset.labels[rows]), mesh, BATCH)
    state, metrics = compiled(state, batch, parallel.replicate(jax.random.key(step), mesh), None)
    losses.append(float(metrics["loss"]))
  return losses


def main(out: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  one, eight = parallel.make_mesh(1), parallel.make_mesh(8)
  arrays = {"losses/one": np.asarray(_step_losses(one)),
            "losses/eight": np.asarray(_step_losses(eight))}
  results = {}
  results["one"] = _fit(f"{out}/one", one, 2)
  results["eight"] = _fit(f"{out}/eight", eight, 2)
  results["fsdp"] = _fit(f"{out}/fsdp", eight, 2, fsdp=True)
  # Cross restores: a finished run restores its last checkpoint and takes no step.
  results["eight_on_one"] = _fit(f"{out}/eight", one, 2)
  results["one_on_eight"] = _fit(f"{out}/one", eight, 2)
  # One epoch on 1 device, the second on 8 devices.
  _fit(f"{out}/mixed", one, 1)
  results["mixed"] = _fit(f"{out}/mixed", eight, 2)
  results["bf16"] = _fit(f"{out}/bf16", eight, 2, dtype="bfloat16")
  for name, state in results.items():
    leaves = _leaves((state.params, state.batch_stats, state.opt_state))
    for index, (path, leaf) in enumerate(leaves):
      arrays[f"{name}/{index}/{path}"] = leaf
  devices = lambda state: len(jax.tree.leaves(state.params)[0].sharding.device_set)
  arrays["devices/eight_on_one"] = np.asarray(devices(results["eight_on_one"]))
  arrays["devices/one_on_eight"] = np.asarray(devices(results["one_on_eight"]))
  fsdp_specs = [str(leaf.sharding.spec) for leaf in jax.tree.leaves(results["fsdp"].params)]
  arrays["fsdp_split_leaves"] = np.asarray(sum("data" in spec for spec in fsdp_specs))
  arrays["bf16_param_dtypes"] = np.asarray(sorted({str(leaf.dtype) for leaf in
                                                   jax.tree.leaves(results["bf16"].params)}))
  # Gradient accumulation: one batch of every image twice in a row (rows 2i, 2i+1); microbatch j
  # of 2 takes rows j, j+2, ..., so each holds every distinct image once, as does the whole
  # batch (BatchNorm statistics included): two microbatches must give the one-batch update.
  dataset = data.make_synthetic(48, seed=6)
  doubled = (np.repeat(dataset.images, 2, axis=0), np.repeat(dataset.labels, 2, axis=0))
  for steps in (1, 2):
    state = _fit(f"{out}/accumulate{steps}", eight, 1, accumulation_steps=steps,
                 images=doubled[0], labels=doubled[1], augment=False, batch_size=96)
    for index, (path, leaf) in enumerate(_leaves((state.params, state.opt_state))):
      arrays[f"accumulate{steps}/{index}/{path}"] = leaf
  np.savez(f"{out}/states.npz", **arrays)


if __name__ == "__main__":
  main(sys.argv[1])
