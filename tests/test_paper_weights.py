"""The offline weights cache: fetching through timm's pretrained loading, and strict cache reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch

from advalign.io import PipelineError
from advalign.weights import (
    cached_weights_path,
    fetch_pretrained_weights,
    missing_cached_weights,
    require_cached_weights,
    require_complete_cache,
)

TINY = "test_resnet.r160_in1k"  # timm's own tiny test architecture, with a pretrained tag


def test_missing_cache_file_names_the_model(tmp_path):
    with pytest.raises(PipelineError, match="pretrained weights of model 'vgg16' are not in the weights cache") as info:
        require_cached_weights(tmp_path, "vgg16")
    assert "\n" not in str(info.value) and str(tmp_path / "vgg16.pth") in str(info.value)
    (tmp_path / "vgg16.pth").write_bytes(b"x")
    assert require_cached_weights(tmp_path, "vgg16") == cached_weights_path(tmp_path, "vgg16")
    assert missing_cached_weights(tmp_path, ["vgg16", "resnet50", "dla34"]) == ["resnet50", "dla34"]
    with pytest.raises(PipelineError, match=r"model 'resnet50' are not in the weights cache \(2 model\(s\) missing\)"):
        require_complete_cache(tmp_path, ["vgg16", "resnet50", "dla34"])
    require_complete_cache(tmp_path, ["vgg16"])


def test_fetch_saves_timms_pretrained_state_dict(tmp_path):
    """timm's real pretrained-loading path, pointed at a local file instead of the hub."""
    torch.manual_seed(0)
    source = timm.create_model(TINY, pretrained=False)
    source_file = tmp_path / "published.pth"
    torch.save(source.state_dict(), source_file)
    row = {
        "model": "tiny",
        "timm_name": TINY,
        "timm_kwargs": json.dumps({"pretrained_cfg_overlay": {"file": str(source_file)}}),
    }
    out = fetch_pretrained_weights(row, tmp_path / "cache" / "tiny.pth")
    cached = torch.load(out, weights_only=True)
    assert set(cached) == set(source.state_dict())
    assert all(torch.equal(cached[k], v) for k, v in source.state_dict().items())
    # The cache holds a plain state dict that the attack stage loads without a download.
    from advalign.models import load_model

    model, meta = load_model(out, {"model": "tiny", "timm_name": TINY, "timm_kwargs": "{}"})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in cached.items())
    assert tuple(meta["data_config"]["input_size"]) == (3, 160, 160)


def test_fetch_without_network_is_one_line(tmp_path):
    script = (
        "from advalign.weights import fetch_pretrained_weights\n"
        "from advalign.io import PipelineError\n"
        "try:\n"
        f"    fetch_pretrained_weights({{'model': 'tiny', 'timm_name': '{TINY}'}}, 'out.pth')\n"
        "except PipelineError as exc:\n"
        "    print(exc)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "t")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0].startswith(f"model 'tiny': cannot fetch pretrained weights '{TINY}'")
    assert "needs network access" in lines[0]
    assert not (tmp_path / "out.pth").exists()


def test_fetch_refuses_unknown_names(tmp_path):
    with pytest.raises(PipelineError, match="no pretrained weights 'test_resnet.nope'"):
        fetch_pretrained_weights({"model": "m", "timm_name": "test_resnet.nope"}, tmp_path / "m.pth")
    assert not (tmp_path / "m.pth").exists()
