"""The benchmark tools: FLOP counts, MFU, paired timing rounds, and the stage-time extrapolation
of a config."""

import os
import subprocess

import jax
import jax.numpy as jnp
import pytest

from benchmarks import compare, hardware, stages

from conftest import ROOT, write_executable


def test_compiled_flops_count_a_matrix_product():
  product = jax.jit(lambda a, b: a @ b)
  flops = hardware.compiled_flops(product, jnp.ones((64, 32)), jnp.ones((32, 16)))
  assert flops == 2 * 64 * 32 * 16


def test_utilisation_against_the_listed_peak(monkeypatch):
  kind = jax.devices()[0].device_kind
  monkeypatch.setitem(hardware.PEAK_TFLOPS, kind, (4.0, 2.0))
  tflops, mfu = hardware.utilisation(3e12, 1.5, "float32")
  assert tflops == pytest.approx(2.0) and mfu == pytest.approx(1.0)
  assert hardware.utilisation(3e12, 1.5, "bfloat16")[1] == pytest.approx(0.5)
  assert hardware.utilisation(3e12, 1.5, "float32", num_devices=4)[1] == pytest.approx(0.25)
  monkeypatch.delitem(hardware.PEAK_TFLOPS, kind)
  assert hardware.utilisation(3e12, 1.5, "float32") == (pytest.approx(2.0), None)
  assert hardware.utilisation(None, 1.5, "float32") == (None, None)


def test_cpu_summary_names_the_widest_vector_instructions():
  avx2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx fma avx2\n"
  assert hardware.cpu_summary(avx2) == "AMD EPYC, AVX2+FMA"
  assert hardware.cpu_summary(avx2.replace("avx2", "avx2 avx512f")) == "AMD EPYC, AVX-512+FMA"
  assert hardware.cpu_summary("Features\t: fp asimd\n") == "unknown CPU, NEON"
  assert hardware.matmul_gflops(size=64, repeats=1) > 0


def test_paired_rounds_alternate_which_side_goes_first():
  calls = []

  def side(tag, seconds):
    def call(name):
      calls.append((tag, name))
      return seconds[name]
    return call

  pairs = compare.paired_seconds(side("ours", {"a": 1.0, "b": 3.0}),
                                 side("theirs", {"a": 2.0, "b": 5.0}), ("a", "b"), repeats=3)
  assert pairs == {"a": [(1.0, 2.0)] * 3, "b": [(3.0, 5.0)] * 3}  # always (ours, theirs)
  assert calls[:4] == [("ours", "a"), ("theirs", "a"), ("ours", "b"), ("theirs", "b")]
  assert calls[4:8] == [("theirs", "a"), ("ours", "a"), ("theirs", "b"), ("ours", "b")]
  assert calls[8:] == calls[:4] and len(calls) == 12


def test_iterations_extrapolate_linearly_from_two_and_four():
  assert (stages.SHORT, stages.LONG) == (2, 4)
  assert stages.linear_extrapolation(3.0, 7.0, 100) == pytest.approx(3.0 + 98 * 2.0)
  assert stages.linear_extrapolation(3.0, 2.5, 100) == 3.0  # noise: never below the short call
  params = {"eps": 0.03, "steps": 100, "square_queries": 5000, "n_target_classes": 9}
  keys = stages.iteration_params("autoattack", params)
  assert keys == ("steps", "square_queries")
  assert stages.scaled_params(params, keys, 2) == dict(params, steps=2, square_queries=100)
  assert stages.iteration_params("square", {"eps": 0.03, "n_queries": 10}) == ("n_queries",)
  assert stages.iteration_params("fgsm", {"eps": 0.03}) == ()


def test_set_sizes_fill_whole_splits_and_cap_subsets(tiny_config):
  tiny_config.data.num_train = 0
  tiny_config.craft.num_examples = 700
  tiny_config.eval.num_examples = 0
  assert stages.set_sizes(tiny_config, 1000, 300) == {"train": 1000, "craft": 700, "eval": 100}
  assert stages.set_sizes(tiny_config, 500, 50)["craft"] == 500
  assert stages.set_sizes(tiny_config, 500, 50)["eval"] == 50


def test_measure_times_each_stage_with_the_pipeline_step_counts(tiny_config):
  tiny_config.stages = "train_classifier,craft,evaluate"
  tiny_config.eval.attacks = "none,pgd"
  tiny_config.eval.pgd.steps = 10  # extrapolated from 2 and 4 (craft: 2 steps, timed whole)
  tiny_config.eval.defenses = "none"
  lines = []
  rows = stages.measure(tiny_config, 300, 100, 10, repeats=1, log=lines.append)
  calls = {(row.stage, row.part.split(" (")[0]): row.calls for row in rows}
  assert calls == {
      ("train_classifier", "classifier step"): 2 * (300 // 50),  # epochs x steps per epoch
      ("craft", "CAF attack"): 3,  # ceil(300 / 100) chunks
      ("evaluate", "none attack"): 1, ("evaluate", "pgd attack"): 1,
      ("evaluate", "predict behind none"): 2}  # one per attacked batch
  assert all(row.call_seconds > 0 for row in rows if row.part != "none attack")
  assert rows[0].flops > 1e6  # XLA's count of the classifier step
  assert len(lines) == len(rows) and "pgd attack (10 it. from 2 and 4)" in lines[-2]
  assert "it. from" not in lines[1]
  assert stages.summary(rows)[-1].split()[0] == "pipeline"
  tiny_config.eval.threat_models = "unseen,white_box"
  tiny_config.eval.sweep_eps = (0.0,)
  assert stages.skipped_evaluation(tiny_config) == ["threat model white_box",
                                                    "eps sweep of pgd (1 budgets)"]


@pytest.mark.slow  # compiles the denoiser steps (~1 min on 2 cores)
def test_measure_times_the_denoiser_stages(tiny_config):
  tiny_config.stages = "train_denoiser,train_baselines,evaluate"
  tiny_config.eval.attacks = "fgsm"
  tiny_config.eval.defenses = "none,cafd,pixel"
  rows = stages.measure(tiny_config, 300, 100, 10, repeats=1, log=lambda line: None)
  calls = {(row.stage, row.part): row.calls for row in rows}
  assert calls == {
      ("train_denoiser", "denoiser + discriminator step"): 300 // 50,
      ("train_baselines", "pixel denoiser step"): 300 // 50,
      ("evaluate", "fgsm attack"): 1, ("evaluate", "predict behind none"): 1,
      ("evaluate", "predict behind cafd"): 1, ("evaluate", "predict behind pixel"): 1}
  assert all(row.flops > 1e6 for row in rows if row.stage.startswith("train"))


ACCELERATOR_SCRIPT = ROOT / "benchmarks" / "accelerator.sh"


def _run_accelerator_script(tmp_path, *args, cuda_torch=True):
  """accelerator.sh with PYTHON set to a stub that logs its arguments, prints them, fails on
  bfloat16 and, unless ``cuda_torch``, on the script's check for a CUDA torch."""
  calls = tmp_path / "calls.txt"
  stub = write_executable(
      tmp_path / "python", f'#!/usr/bin/env bash\necho "$*" >> {calls}\necho "stub $*"\n'
      '[[ "$*" != *bfloat16* ]] && [[ "$*" != *cuda* || -z "$NO_CUDA" ]]\n')
  env = dict(os.environ, PYTHON=str(stub), NO_CUDA="" if cuda_torch else "1")
  result = subprocess.run(["bash", str(ACCELERATOR_SCRIPT), *args], capture_output=True,
                          text=True, env=env, timeout=60)
  lines = calls.read_text().splitlines() if calls.exists() else []
  return result, [line for line in lines if "import torch" not in line]


def test_accelerator_script_runs_the_named_parts_and_reports_failures(tmp_path):
  out = tmp_path / "results"
  result, calls = _run_accelerator_script(tmp_path, str(out), "stages_bfloat16",
                                          "compare_float32")
  assert result.returncode == 1 and "failed or timed out: stages_bfloat16" in result.stdout
  assert len(calls) == 2  # in the order given; the failing first part did not stop the second
  assert calls[0].startswith("-m benchmarks.stages") and "compute_dtype=bfloat16" in calls[0]
  assert calls[1] == ("-m benchmarks.compare --models vgg19,resnet18 --batch_size 128 --dtype "
                      f"float32 --warmup 2 --repeats 5 --out {out}/compare_float32.json")
  assert (out / "compare_float32.log").read_text().startswith("stub -m benchmarks.compare")


def test_accelerator_script_compares_without_torch_when_it_has_no_cuda(tmp_path):
  result, calls = _run_accelerator_script(tmp_path, str(tmp_path / "results"),
                                          "compare_float32", cuda_torch=False)
  assert result.returncode == 0 and len(calls) == 1
  assert " --repeats 5 --no_torch --out " in calls[0]


def test_accelerator_script_refuses_an_unknown_part_before_running_anything(tmp_path):
  out = tmp_path / "results"
  result, calls = _run_accelerator_script(tmp_path, str(out), "compare_float32", "stages_fp8")
  assert result.returncode == 2 and "unknown part 'stages_fp8'" in result.stderr
  assert calls == [] and not out.exists()
