"""benchmarks/channels_last.py times the demo's real training steps in both memory formats."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

from channels_last import main  # noqa: E402


def test_it_times_each_models_own_objective_in_both_formats(tmp_path, capsys, one_thread):
    out = tmp_path / "times.json"
    assert main(["--models", "resnet_demo,resnet_demo_harmonized", "--steps", "1", "--rounds", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "whole zoo, weighted by training steps" in printed
    result = json.loads(out.read_text())
    assert result["config"] == "config/config.yaml" and result["image_size"] == 32
    rows = {row["model"]: row for row in result["models"]}
    # 3000 training images in batches of 64: 47 steps an epoch; 8 epochs for a base, 2 for a fine-tune.
    assert rows["resnet_demo"]["train_steps"] == 8 * 47 and rows["resnet_demo_harmonized"]["train_steps"] == 2 * 47
    assert rows["resnet_demo_harmonized"]["kind"] == "harmonized"
    for row in rows.values():
        assert row["contiguous_ms"] > 0 and row["channels_last_ms"] > 0
        assert row["ratio"] == pytest.approx(row["channels_last_ms"] / row["contiguous_ms"])
    seconds = result["zoo_seconds"]
    weighted = sum(row["train_steps"] * row["contiguous_ms"] for row in rows.values()) / 1000
    assert seconds["contiguous"] == pytest.approx(weighted)


def test_an_unknown_model_is_one_line():
    with pytest.raises(SystemExit, match="--models: nonexistent_model not in the zoo"):
        main(["--models", "nonexistent_model"])
