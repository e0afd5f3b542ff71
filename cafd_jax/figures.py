"""PNG figures of a run, drawn only from what the workdir holds (report.json, arrays, logs).

* ``accuracy_vs_eps.png``: accuracy against the attack budget, one curve per defense and threat
  model, for every attack evaluated at two or more budgets (``eval.sweep_eps``).
* ``cam_grid.png``: natural / adversarial / denoised images with their class activation maps
  (the paper's core picture), from ``figures/cam_grid.npz`` written by the evaluate stage.
* ``training_curves.png``: the scalars every training stage logged to TensorBoard.
"""

import struct
from typing import Sequence

import numpy as np

from cafd_jax import io_utils

ACCURACY_VS_EPS = "accuracy_vs_eps.png"
CAM_GRID = "cam_grid.png"
TRAINING_CURVES = "training_curves.png"
CAM_ARRAYS = "cam_grid.npz"


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(figure, path: str) -> None:
  """Writes a PNG atomically (never a half-written file)."""
  io_utils.write_atomically(
      path, lambda file: figure.savefig(file, format="png", dpi=110, bbox_inches="tight"))
  _pyplot().close(figure)


def eps_curves(results: Sequence[dict]) -> dict[str, dict[tuple[str, str, str], list[tuple]]]:
  """{attack: {(defense, threat model, model): [(eps, accuracy), ...]}} for swept attacks."""
  curves: dict[str, dict[tuple[str, str, str], dict[float, float]]] = {}
  for row in results:
    if row["attack"] in ("none", "caf") or row.get("eps") is None:
      continue
    key = (row["defense"], row["threat_model"], row.get("model", ""))
    curves.setdefault(row["attack"], {}).setdefault(key, {})[row["eps"]] = row["accuracy"]
  return {attack: {key: sorted(points.items()) for key, points in by_key.items()}
          for attack, by_key in curves.items()
          if max(len(points) for points in by_key.values()) >= 2}


def accuracy_vs_eps(results: Sequence[dict], path: str) -> bool:
  """Draws the curves of ``eps_curves``; False (and no file) when nothing was swept."""
  curves = eps_curves(results)
  if not curves:
    return False
  several_models = len({row.get("model") for row in results}) > 1
  plt = _pyplot()
  figure, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
  for axis, (attack, by_key) in zip(axes[0], sorted(curves.items())):
    for (defense, threat, model), points in sorted(by_key.items()):
      eps, accuracy = zip(*points)
      style = "-" if threat == "unseen" else "--"
      label = f"{defense} ({threat}{', ' + model if several_models else ''})"
      axis.plot(np.array(eps) * 255, accuracy, style, marker="o", label=label)
    axis.set(title=attack, xlabel="eps (x 1/255)", ylabel="accuracy", ylim=(0, 1))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
  _save(figure, path)
  return True


def cam_grid(arrays: dict[str, np.ndarray], path: str) -> None:
  """One row per example: each image of ``arrays['images']`` next to its CAM overlay.

  ``arrays``: ``images`` [K, N, H, W, 3] and ``cams`` [K, N, H, W] in [0, 1] for the K panels
  named by ``titles`` [K] (natural, adversarial, then each denoised version); the predicted
  class names ``predicted`` [K, N] and the true ones ``labels`` [N] caption each image.
  """
  images, cams, titles = arrays["images"], arrays["cams"], [str(t) for t in arrays["titles"]]
  predicted, labels = arrays["predicted"], arrays["labels"]
  panels, count = images.shape[:2]
  plt = _pyplot()
  figure, axes = plt.subplots(count, 2 * panels, figsize=(1.3 * 2 * panels, 1.4 * count),
                              squeeze=False)
  for row in range(count):
    for panel in range(panels):
      image_axis, cam_axis = axes[row, 2 * panel], axes[row, 2 * panel + 1]
      image_axis.imshow(np.clip(images[panel, row], 0, 1))
      correct = predicted[panel, row] == labels[row]
      image_axis.text(0.5, -0.08, str(predicted[panel, row]), transform=image_axis.transAxes,
                      ha="center", va="top", fontsize=6, color="green" if correct else "red")
      cam_axis.imshow(np.clip(images[panel, row], 0, 1))
      cam_axis.imshow(cams[panel, row], cmap="jet", alpha=0.5, vmin=0, vmax=1)
      if row == 0:
        image_axis.set_title(titles[panel], fontsize=7)
        cam_axis.set_title("CAM", fontsize=7)
  for axis in axes.ravel():
    axis.axis("off")
  _save(figure, path)


def _records(path: str):
  """The raw records of a TFRecord file (TensorBoard event files are TFRecords)."""
  with io_utils.path(path).open("rb") as file:
    while header := file.read(12):
      if len(header) < 12:
        return
      (length,) = struct.unpack("<Q", header[:8])
      payload = file.read(length)
      file.read(4)  # payload checksum
      if len(payload) < length:
        return
      yield payload


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} from the TensorBoard event files in ``log_dir`` and its folders."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars: dict[str, dict[int, float]] = {}
  folder = io_utils.path(log_dir)
  # log_dir's event files and its stage folders' ("**" is refused on buckets)
  patterns = ("events.out.tfevents.*", "*/events.out.tfevents.*")
  found = [path for pattern in patterns for path in folder.glob(pattern)] if folder.exists() else []
  for path in sorted(found):
    for payload in _records(path):
      event = event_pb2.Event.FromString(payload)
      for value in event.summary.value:
        if value.HasField("simple_value"):
          scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return {tag: sorted(points.items()) for tag, points in sorted(scalars.items())}


def training_curves(log_dir: str, path: str) -> bool:
  """One panel per training stage with all its scalars; False (no file) without logs."""
  scalars = read_scalars(log_dir)
  stages: dict[str, dict[str, list]] = {}
  for tag, points in scalars.items():
    stage, _, name = tag.partition("/")
    stages.setdefault(stage, {})[name or stage] = points
  if not stages:
    return False
  plt = _pyplot()
  figure, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.6), squeeze=False)
  for axis, (stage, series) in zip(axes[0], stages.items()):
    for name, points in series.items():
      steps, values = zip(*points)
      values = np.asarray(values)
      scale = np.max(np.abs(values)) or 1.0  # losses differ by orders of magnitude
      axis.plot(steps, values / scale, label=f"{name} (/{scale:.3g})")
    axis.set(title=stage, xlabel="step", ylabel="value / max |value|")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
  _save(figure, path)
  return True
