"""Measured cue reliance (advalign.reliance): the conflict scores, the occlusion and the file checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from advalign import columns
from advalign.data.synthetic import write_synthetic_dataset
from advalign.io import PipelineError
from advalign.models import NormalizedModel
from advalign.reliance import OCCLUSION_THRESHOLD, cue_scores, load_conflict_set, model_reliance, occluded, predict

SPEC = {"n_classes": 4, "train_per_class": 2, "heldout_per_class": 2, "stimuli_per_class": 5, "conflict_per_class": 5}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    outputs = {split: folder / f"{split}.npz" for split in (*columns.SPLITS, columns.CONFLICT_SPLIT)}
    outputs.update(classes=folder / "classes.csv", manifest=folder / "manifest.csv")
    write_synthetic_dataset(SPEC, seed=0, outputs=outputs)
    return outputs


def test_conflict_scores_count_each_decision_once():
    part, context = np.array([0, 1, 2, 3, 0]), np.array([1, 2, 3, 0, 2])
    scores = cue_scores(np.array([0, 2, 2, 1, 3]), part, context)
    assert (scores["n_conflict_part"], scores["n_conflict_context"], scores["n_conflict_other"]) == (2, 1, 2)
    assert scores["part_reliance"] == pytest.approx(2 / 3)
    assert np.isnan(cue_scores(np.array([3]), np.array([0]), np.array([1]))["part_reliance"])  # neither cue


def test_occlusion_replaces_exactly_one_region_and_is_seeded(world):
    with np.load(world["stimuli"]) as data:
        images, maps = data["images"], data["maps"]
    inside = occluded(images, maps, inside=True)
    outside = occluded(images, maps, inside=False)
    region = maps >= OCCLUSION_THRESHOLD
    pixels = images.astype(np.float32) / 255.0
    np.testing.assert_array_equal(inside[~region], pixels[~region])
    np.testing.assert_array_equal(outside[region], pixels[region])
    assert (np.abs(inside - pixels).max(axis=-1)[region] > 0).mean() > 0.9
    np.testing.assert_array_equal(inside, occluded(images, maps, inside=True))  # same seed, same noise


class _ReadsTheCorner(torch.nn.Module):
    """A 'model' whose decision is a fixed function of the pixels: it follows neither cue on purpose."""

    def forward(self, x):
        return torch.stack([x[:, c, :4, :4].mean((1, 2)) for c in range(3)] + [x[:, 0, :4, :4].mean((1, 2)) * 0], 1)


def test_model_reliance_reports_every_column(world):
    net = NormalizedModel(_ReadsTheCorner(), mean=(0, 0, 0), std=(1, 1, 1))
    conflict = load_conflict_set(world["conflict"])
    with np.load(world["stimuli"]) as data:
        stimuli = {k: data[k] for k in data.files}
    row = model_reliance(net, conflict, stimuli)
    assert set(row) == set(columns.RELIANCE_COLUMNS) - {"model"}
    assert row["n_conflict"] == 20 and row["n_stimuli"] == 20
    assert row["n_conflict_part"] + row["n_conflict_context"] + row["n_conflict_other"] == 20
    predictions = predict(net, conflict["images"])
    assert row["n_conflict_part"] == int((predictions == conflict["part"]).sum())
    for key in ("accuracy_stimuli", "accuracy_part_occluded", "accuracy_context_occluded"):
        assert 0.0 <= row[key] <= 1.0


def test_a_broken_conflict_set_is_a_one_line_error(world, tmp_path):
    with np.load(world["conflict"]) as data:
        arrays = {k: data[k] for k in data.files}
    no_context = tmp_path / "no_context.npz"
    np.savez(no_context, **{k: v for k, v in arrays.items() if k != "context"})
    with pytest.raises(PipelineError, match="missing array.*context"):
        load_conflict_set(no_context)
    agreeing = tmp_path / "agreeing.npz"
    np.savez(agreeing, **{**arrays, "context": arrays["part"]})
    with pytest.raises(PipelineError, match="not a conflict set"):
        load_conflict_set(agreeing)
    with pytest.raises(PipelineError, match="not found"):
        load_conflict_set(tmp_path / "absent.npz")
