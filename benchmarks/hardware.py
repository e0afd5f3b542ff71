"""FLOPs of compiled steps and the peak rates of accelerators: model FLOP utilisation (MFU).

FLOPs are XLA's count for the compiled program (``Compiled.cost_analysis()``), i.e. the
arithmetic of the step as this project runs it (on GPU/TPU the plain convolutions; on CPU the
row-wise kernel gradients count as their matrix products). A loop body counts once, so only
loop-free steps are reported this way.
"""

import jax

# Dense peak TFLOP/s per chip from the vendors' data sheets: (bfloat16, float32). On NVIDIA
# GPUs XLA runs float32 matrix products and convolutions as TensorFloat-32 by default, so the
# float32 column is the TF32 tensor-core peak; TPUs run float32 products as bfloat16 passes.
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": (989.4, 494.7),  # SXM5
    "NVIDIA H100 PCIe": (756.5, 378.0),
    "NVIDIA H100 NVL": (835.5, 417.5),
    "NVIDIA H200": (989.4, 494.7),
    "NVIDIA A100-SXM4-80GB": (312.0, 156.0),
    "NVIDIA A100-SXM4-40GB": (312.0, 156.0),
    "NVIDIA A100 80GB PCIe": (312.0, 156.0),
    "TPU v4": (275.0, 275.0),
    "TPU v5 lite": (197.0, 197.0),
    "TPU v5": (459.0, 459.0),
    "TPU v6 lite": (918.0, 918.0),
}


def compiled_flops(jitted, *args) -> float | None:
  """XLA's FLOP count of ``jitted(*args)`` as compiled (None where the backend gives none)."""
  analysis = jitted.lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def peak_flops(dtype: str, device: jax.Device | None = None) -> float | None:
  """Peak FLOP/s of one ``device`` (default: the first) for ``dtype``; None if not listed."""
  kind = (device or jax.devices()[0]).device_kind
  peaks = PEAK_TFLOPS.get(kind)
  if peaks is None:
    return None
  return 1e12 * (peaks[0] if dtype == "bfloat16" else peaks[1])


def utilisation(flops: float | None, seconds: float, dtype: str,
                num_devices: int = 1) -> tuple[float | None, float | None]:
  """(achieved TFLOP/s, MFU as a fraction of the devices' peak or None)."""
  if not flops:
    return None, None
  achieved = flops / seconds
  peak = peak_flops(dtype)
  return achieved / 1e12, (achieved / (peak * num_devices) if peak else None)
