"""The defended classifier as one file: ``jax.export`` (StableHLO), weights included.

    python -m cafd_jax.export --workdir DIR --out FILE [--denoiser cafd] [--platforms cpu,cuda]

The file holds ``logits = classifier(denoiser(images))`` for float32 images [B, S, S, 3] in
[0, 1] with a symbolic batch B, for each platform named, and its first-order VJP, so attack
libraries can differentiate it. Loading needs nothing but jax:

    from jax import export
    with open(FILE, "rb") as file:
      defended = export.deserialize(bytearray(file.read()))
    logits = defended.call(images)      # jax.grad / jax.vjp work through it
"""

import argparse
import sys
import time

import jax
import jax.numpy as jnp
from jax import export as jax_export

from cafd_jax import api, checkpoint, config_checks, evaluate, factory, io_utils, pipeline

DENOISER_CHOICES = evaluate.DENOISERS + ("none",)
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def defended_function(workdir: str, denoiser: str = "cafd"):
  """``logits(images)`` of the run in ``workdir``, behind ``denoiser`` (``none``: the classifier
  alone), with the trained variables as constants, and the image size."""
  if denoiser not in DENOISER_CHOICES:
    raise config_checks.ConfigError(
        f"--denoiser must be one of {','.join(DENOISER_CHOICES)}, got {denoiser!r}.")
  config = api.read_config(workdir)
  num_classes = len(api.class_names_of(workdir))
  classifier = factory.classifier(config, num_classes)
  classifier_variables = pipeline.restore_classifier(config, workdir, num_classes)
  if denoiser == "none":
    return (lambda images: classifier.apply(classifier_variables, images)), config.data.image_size
  denoiser_module = factory.denoiser(config)
  denoiser_variables = pipeline.restore_denoiser(config, workdir, denoiser)

  def logits(images):
    return classifier.apply(classifier_variables, denoiser_module.apply(denoiser_variables, images))
  return logits, config.data.image_size


def export_defended(workdir: str, denoiser: str = "cafd",
                    platforms: tuple[str, ...] = ("cpu", "cuda")) -> bytes:
  """The serialised ``jax.export.Exported`` of the defended classifier (VJP included)."""
  unknown = [name for name in platforms if name not in PLATFORMS]
  if unknown or not platforms:
    raise config_checks.ConfigError(f"--platforms must name some of {','.join(PLATFORMS)}, got "
                                    f"{','.join(platforms) or 'none'}.")
  function, size = defended_function(workdir, denoiser)
  batch = jax_export.symbolic_shape("batch")[0]
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  exported = jax_export.export(jax.jit(function), platforms=tuple(platforms))(images)
  return bytes(exported.serialize(vjp_order=1))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the --workdir of a finished main.py run")
  parser.add_argument("--out", required=True, help="the file to write")
  parser.add_argument("--denoiser", default="cafd", choices=DENOISER_CHOICES)
  parser.add_argument("--platforms", default="cpu,cuda",
                      help=f"comma-separated, of {','.join(PLATFORMS)}")
  args = parser.parse_args(argv)
  started = time.perf_counter()
  try:
    serialized = export_defended(args.workdir, args.denoiser,
                                 tuple(name for name in args.platforms.split(",") if name))
    io_utils.write_atomically(args.out, lambda file: file.write(serialized))
  except (config_checks.ConfigError, checkpoint.CheckpointError, OSError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  print(f"[export] {args.out}: {len(serialized) / 2**20:.2f} MiB, defended classifier "
        f"(denoiser {args.denoiser}, platforms {args.platforms}) in "
        f"{time.perf_counter() - started:.1f}s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
