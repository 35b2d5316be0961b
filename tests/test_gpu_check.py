"""benchmarks/gpu_check.py --smoke: the GPU check's own code, on CPU at toy sizes, as CI runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_gpu_check_smoke_runs_every_section(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert set(sections) == {"precision", "search", "harmonizer_step", "ddp_step", "memory"}
    assert all(s["ok"] for s in sections.values()), {k: s.get("error") for k, s in sections.items()}
    variants = sections["precision"]["variants"]
    assert set(variants) == {f"{p}{c}" for p in ("fp32", "tf32", "bf16") for c in ("", "+channels_last")}
    assert variants["fp32"]["max_rel_diff"] == 0.0 and variants["fp32"]["fooled"] > 0
    assert all(v["ran_as"] == "fp32" for v in variants.values())  # CPU: TF32/bf16/channels-last apply on CUDA only
    search = sections["search"]
    assert search["fooled"] > 0 and search["passes_per_image"] > 0 and search["achieved_tflops"] > 0
    assert sections["harmonizer_step"]["finite"]
    assert sections["ddp_step"]["world_size"] == 2 and sections["ddp_step"]["weights_equal_across_ranks"]
    assert set(sections["memory"]) - {"ok", "section_seconds"} == {"resnet10t", "vit_tiny_patch16_224"}
