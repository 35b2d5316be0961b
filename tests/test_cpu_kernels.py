"""CPU kernels pinned at AVX2 (advalign.cpu_kernels): the caps, that torch obeys them, and that
the Snakefile's pin reaches every training job."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from advalign.cpu_kernels import CPU_KERNELS, active_kernels, kernel_environment, pin
from advalign.io import PipelineError


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((l for l in text.splitlines() if l.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


X86_WITH_AVX2 = platform.machine().lower() in ("x86_64", "amd64") and "avx2" in _cpu_flags()


def test_avx2_caps_all_three_libraries_on_x86_only():
    caps = kernel_environment("avx2", machine="x86_64")
    assert caps == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert kernel_environment("avx2", machine="aarch64") == {}
    assert kernel_environment("native", machine="x86_64") == {}
    assert set(CPU_KERNELS) == {"avx2", "native"}
    with pytest.raises(PipelineError, match="cpu_kernels 'avx512' is not one of avx2, native"):
        kernel_environment("avx512")


def test_pin_overrides_what_the_environment_said():
    environ = {"ATEN_CPU_CAPABILITY": "avx512", "PATH": "/bin"}
    assert pin("avx2", environ=environ, machine="x86_64")
    assert environ["ATEN_CPU_CAPABILITY"] == "avx2" and environ["PATH"] == "/bin"
    assert environ["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"
    untouched = {"ATEN_CPU_CAPABILITY": "avx512"}
    assert pin("native", environ=untouched, machine="x86_64") == {}
    assert untouched == {"ATEN_CPU_CAPABILITY": "avx512"}


def _torch_kernels(env: dict) -> str:
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return proc.stdout.strip()


@pytest.mark.skipif(not X86_WITH_AVX2, reason="needs an x86-64 CPU with AVX2")
def test_torch_started_with_the_caps_runs_avx2_kernels():
    env = {k: v for k, v in os.environ.items() if k not in kernel_environment("avx2", "x86_64")}
    native = _torch_kernels(env)
    pin("avx2", environ=env)
    assert _torch_kernels(env) == "AVX2", f"native kernels here: {native}"


@pytest.mark.skipif(not X86_WITH_AVX2, reason="needs an x86-64 CPU with AVX2")
def test_tests_recompute_with_the_kernels_the_workflow_jobs_use():
    # Tests that recompute a job's numbers in this process (test_real_models) compare them at
    # rtol 1e-6: on an AVX-512 machine they differ when this process runs native kernels.
    assert active_kernels() == "AVX2"


@pytest.mark.slow
@pytest.mark.skipif(not X86_WITH_AVX2, reason="needs an x86-64 CPU with AVX2")
def test_every_training_job_of_a_workflow_run_recorded_avx2(tiny_run):
    metrics = sorted(Path(tiny_run.path("results/models")).glob("*/metrics.json"))
    assert metrics, "the tiny run trained no model"
    for path in metrics:
        record = json.loads(path.read_text())
        assert record["device"] == "cpu"
        assert record["cpu_kernels"] == "AVX2", f"{path}: {record['cpu_kernels']}"
