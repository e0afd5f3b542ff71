"""``import cafd_jax`` sets its XLA:CPU flags, only when they can take effect and are known."""

import os
import subprocess
import sys

import jaxlib
import pytest

from cafd_jax import cpu_flags

from conftest import ROOT

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
MEASURED = ".".join(map(str, cpu_flags.MEASURED_JAXLIB)) + ".2"

# Compiles one 32x32 convolution after importing cafd_jax and prints XLA_FLAGS, then whether
# XLA gave the convolution to YNNPACK (a "ynn_fusion" in the compiled HLO).
_PROBE = """
import os, sys
if sys.argv[1] == "jax_first":
  import jax.numpy as jnp
  jnp.ones(1).block_until_ready()
import cafd_jax, jax, jax.numpy as jnp
conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
text = jax.jit(conv).lower(jnp.ones((8, 32, 32, 64)), jnp.ones((3, 3, 64, 64))).compile().as_text()
print("flags:" + os.environ.get("XLA_FLAGS", ""))
print("ynn" if "ynn_fusion" in text else "xla")
"""


def _probe(xla_flags: str | None, order: str = "cafd_first") -> tuple[str, str]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  result = subprocess.run([sys.executable, "-c", _PROBE, order], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  flags, backend = result.stdout.strip().splitlines()[-2:]
  return flags.removeprefix("flags:"), backend


def test_flag_is_added_to_other_flags_for_the_measured_jaxlib():
  assert cpu_flags.flags_to_add("", MEASURED) == [FLAG]
  assert cpu_flags.flags_to_add("", "0.10rc1.dev") == [FLAG]
  assert cpu_flags.flags_to_add("--xla_force_host_platform_device_count=8", MEASURED) == [FLAG]


@pytest.mark.parametrize("user_value", ["", "+individual_convolution", "individual_dot"])
def test_a_flag_the_user_set_wins(user_value):
  flags = f"--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type={user_value}"
  assert cpu_flags.flags_to_add(flags, MEASURED) == []


@pytest.mark.parametrize("version", ["0.4.30", "0.9.1", "0.11.0", "1.0.0", "dev"])
def test_other_jaxlibs_get_no_flag(version):
  assert cpu_flags.flags_to_add("", version) == []


measured_jaxlib = pytest.mark.skipif(
    cpu_flags._major_minor(jaxlib.__version__) != cpu_flags.MEASURED_JAXLIB,
    reason=f"jaxlib {jaxlib.__version__}: cafd_jax sets its CPU flags for "
           f"{cpu_flags.MEASURED_JAXLIB} only")


@measured_jaxlib
def test_import_turns_ynnpack_convolutions_off_and_keeps_other_flags():
  flags, backend = _probe("--xla_force_host_platform_device_count=2")
  assert flags == f"--xla_force_host_platform_device_count=2 {FLAG}"
  assert backend == "xla"


@measured_jaxlib
def test_user_override_gives_the_convolution_back_to_ynnpack():
  override = "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"
  assert _probe(override) == (override, "ynn")


@measured_jaxlib
def test_nothing_is_set_once_jax_has_started():
  assert _probe(None, order="jax_first") == ("", "ynn")
