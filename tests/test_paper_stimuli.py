"""Paper stimulus selection end to end on tiny ClickMe shards and an ImageNet folder."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from advalign import columns
from advalign.data.clickme import clickme_preprocess, find_shards, index_shard, read_clickme_record
from advalign.data.imagenet import imagenet_classes, imagenet_index
from advalign.data.paper_stimuli import write_paper_stimuli
from advalign.io import PipelineError
from advalign.transforms import model_view
from paper_fixtures import clickme_datum, jpeg_bytes, paper_data, write_shard

CLASSES = [0, 1, 397, 398, 999]


@pytest.fixture
def data(tmp_path):
    return tmp_path, paper_data(tmp_path, CLASSES)


def _outputs(folder):
    return {
        "stimuli": folder / "stimuli.npz",
        "classes": folder / "classes.csv",
        "manifest": folder / "stimuli_manifest.csv",
    }


def _run(tmp_path, spec, seed=0, shards=None, out="out"):
    shards = shards or find_shards(tmp_path / "clickme", ["val-*.tfrecords"])
    outputs = _outputs(tmp_path / out)
    write_paper_stimuli(shards, spec, seed=seed, outputs=outputs)
    return outputs


def test_selection_writes_the_stimulus_contract(data):
    tmp_path, paper = data
    outputs = _run(tmp_path, paper["stimuli"])
    stimuli = np.load(outputs["stimuli"])
    assert tuple(stimuli.files) == columns.SPLIT_ARRAYS
    n = len(CLASSES)
    assert stimuli["images"].shape == (n, 64, 64, 3) and stimuli["images"].dtype == np.uint8
    assert stimuli["maps"].shape == (n, 64, 64) and stimuli["maps"].dtype == np.float32
    assert np.allclose(stimuli["maps"].max(axis=(1, 2)), 1.0) and stimuli["maps"].min() >= 0
    assert stimuli["has_map"].dtype == bool and stimuli["has_map"].all()
    assert stimuli["labels"].dtype == np.int64 and stimuli["labels"].tolist() == CLASSES
    assert len(set(stimuli["ids"])) == n

    classes = pd.read_csv(outputs["classes"])
    assert list(classes.columns) == list(columns.CLASS_COLUMNS) and len(classes) == 1000
    manifest = pd.read_csv(outputs["manifest"])
    assert list(manifest.columns) == list(columns.MANIFEST_COLUMNS)
    assert manifest["image_id"].tolist() == stimuli["ids"].tolist()
    assert manifest["wordnet_id"].tolist() == ["n01440764", "n01443537", "n02655020", "n02666196", "n15075141"]
    assert manifest["animate"].tolist() == [True, True, True, False, False]
    assert manifest["class_name"].tolist()[:2] == ["tench", "goldfish"]


def test_manifest_source_names_the_record_stored(data):
    tmp_path, paper = data
    outputs = _run(tmp_path, paper["stimuli"])
    stimuli = np.load(outputs["stimuli"])
    manifest = pd.read_csv(outputs["manifest"])
    for k, source in enumerate(manifest["source"]):
        shard_name, index = source.split("#")
        record = index_shard(tmp_path / "clickme" / shard_name)[int(index)]
        image, heatmap = clickme_preprocess(*read_clickme_record(record), image_size=64)
        assert record.label == stimuli["labels"][k]
        assert np.array_equal(image, stimuli["images"][k])
        assert np.array_equal(heatmap, stimuli["maps"][k])


def test_choice_is_seeded_and_independent_per_class(data):
    tmp_path, paper = data
    first = pd.read_csv(_run(tmp_path, paper["stimuli"], seed=0, out="a")["manifest"])
    again = pd.read_csv(_run(tmp_path, paper["stimuli"], seed=0, out="b")["manifest"])
    assert first["source"].tolist() == again["source"].tolist()
    seeds = {tuple(pd.read_csv(_run(tmp_path, paper["stimuli"], seed=s, out=f"s{s}")["manifest"])["source"])
             for s in range(6)}
    assert len(seeds) > 1, "the seed never changes the choice"
    # More candidates for class 999 change nothing for the other classes.
    extra = write_shard(tmp_path / "clickme" / "val-2.tfrecords", [clickme_datum(999, s) for s in range(50, 55)])
    shards = find_shards(tmp_path / "clickme", ["val-*.tfrecords"])
    assert extra in shards
    more = pd.read_csv(_run(tmp_path, paper["stimuli"], seed=0, shards=shards, out="c")["manifest"])
    assert more["source"].tolist()[:-1] == first["source"].tolist()[:-1]


def test_two_per_class_and_all_classes(data):
    tmp_path, paper = data
    manifest = pd.read_csv(_run(tmp_path, {**paper["stimuli"], "per_class": 2})["manifest"])
    assert manifest["class_index"].tolist() == [c for c in CLASSES for _ in range(2)]
    assert manifest["source"].is_unique
    with pytest.raises(PipelineError, match=r"class 2 \(n01484850 great white shark\): 0 ClickMe image"):
        _run(tmp_path, {**paper["stimuli"], "classes": "all"}, out="all")


def test_stimuli_go_through_each_models_transform(data):
    tmp_path, paper = data
    stimuli = np.load(_run(tmp_path, paper["stimuli"])["stimuli"])
    config = {"input_size": (3, 48, 48), "crop_pct": 0.875, "interpolation": "bicubic"}
    x, maps = model_view(stimuli["images"], stimuli["maps"], config)
    assert x.shape == (len(CLASSES), 3, 48, 48) and maps.shape == (len(CLASSES), 48, 48)


def test_imagenet_folder_of_the_same_data_set(data):
    tmp_path, paper = data
    index = imagenet_index(paper["imagenet"]["val_dir"])
    assert sorted(set(index["class_index"])) == CLASSES
    wnids = imagenet_classes()["wordnet_id"]
    assert (index["wordnet_id"] == wnids[index["class_index"]].to_numpy()).all()


@pytest.mark.parametrize("problem", ["no_map", "corrupt_map", "missing_shard", "missing_class"])
def test_errors_are_one_line_and_write_nothing(tmp_path, problem):
    good = [clickme_datum(c, 0) for c in (0, 1)]
    if problem == "no_map":
        bad = clickme_datum(1, 1)
        del bad["heatmap"]
        records, pattern = [good[0], bad], "no human map"
    elif problem == "corrupt_map":
        heat = jpeg_bytes(np.full((32, 32), 200, np.uint8))
        records, pattern = [good[0], clickme_datum(1, 1, heatmap=heat[:40])], "'heatmap': corrupt image data"
    else:
        records = good
        pattern = {"missing_shard": "val-7.tfrecords: ClickMe shard not found", "missing_class": "class 5 "}[problem]
    shard = write_shard(tmp_path / "val-0.tfrecords", records)
    shards = [shard, tmp_path / "val-7.tfrecords"] if problem == "missing_shard" else [shard]
    classes = [0, 1, 5] if problem == "missing_class" else [0, 1]
    outputs = _outputs(tmp_path / "out")
    with pytest.raises(PipelineError, match=pattern) as info:
        write_paper_stimuli(shards, {"classes": classes, "image_size": 32}, seed=0, outputs=outputs)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_empty_maps_are_skipped(tmp_path):
    empty = jpeg_bytes(np.zeros((32, 32), np.uint8))
    shard = write_shard(
        tmp_path / "val-0.tfrecords",
        [clickme_datum(4, 0, heatmap=empty), clickme_datum(4, 1, heatmap=empty), clickme_datum(4, 2)],
    )
    manifest = write_paper_stimuli([shard], {"classes": [4], "image_size": 32}, seed=0, outputs=_outputs(tmp_path))
    assert manifest["source"].tolist() == ["val-0.tfrecords#2"]
    only_empty = write_shard(tmp_path / "val-1.tfrecords", [clickme_datum(4, 0, heatmap=empty)])
    with pytest.raises(PipelineError, match="only 0 ClickMe image.* with a non-empty map"):
        write_paper_stimuli([only_empty], {"classes": [4]}, seed=0, outputs=_outputs(tmp_path / "x"))


def test_read_only_arrays_are_preprocessed_without_a_warning():
    """Decoded JPEGs and cached stimulus files are read-only arrays: the ClickMe preprocessing and
    the model's view copy them (a shared read-only array makes torch warn in every job's log)."""
    import warnings

    rng = np.random.default_rng(0)
    image, heatmap = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), rng.random((40, 50))
    image.flags.writeable = heatmap.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, m = clickme_preprocess(image, heatmap, image_size=32)
        x.flags.writeable = m.flags.writeable = False
        view, maps = model_view(x[None], m[None], {"input_size": [3, 24, 24], "crop_pct": 0.875})
    assert x.shape == (32, 32, 3) and view.shape == (1, 3, 24, 24) and maps.shape == (1, 24, 24)
