"""FLOPs of compiled steps and the peak rates of accelerators: model FLOP utilisation (MFU).

FLOPs are XLA's count for the compiled program (``Compiled.cost_analysis()``), i.e. the
arithmetic of the step as this project runs it (on GPU/TPU the plain convolutions; on CPU the
row-wise kernel gradients count as their matrix products). A loop body counts once, so only
loop-free steps are reported this way.
"""

import os
import time

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


def cpu_summary(cpuinfo: str) -> str:
  """The CPU's model and widest vector instructions from a ``/proc/cpuinfo`` text, e.g.
  "AMD EPYC, AVX2+FMA" (a CPU step's speed follows its vector width)."""
  model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                if line.startswith("model name")), "unknown CPU")
  flags = next((set(line.split(":", 1)[1].split()) for line in cpuinfo.splitlines()
                if line.startswith(("flags", "Features"))), set())
  vector = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"),
                                         ("avx", "AVX"), ("asimd", "NEON")) if flag in flags),
                "no AVX")
  return f"{model}, {vector}{'+FMA' if 'fma' in flags else ''}"


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
  """Measured float32 GFLOP/s of a jitted ``size`` x ``size`` matrix product on the default
  device (best of ``repeats``): a one-second yardstick for comparing machines."""
  x = jax.numpy.ones((size, size), jax.numpy.float32)
  product = jax.jit(lambda a: a @ a)
  product(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    product(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best / 1e9


def host_line() -> str:
  """One line on the machine: CPU, cores this process may use, and its matrix-product rate."""
  try:
    with open("/proc/cpuinfo") as file:
      cpu = cpu_summary(file.read())
  except OSError:
    cpu = "unknown CPU"
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return (f"host {cpu}, {cores} cores; float32 matmul "
          f"{matmul_gflops():.0f} GFLOP/s on {jax.devices()[0].device_kind}")
