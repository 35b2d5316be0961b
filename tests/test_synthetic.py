"""The synthetic ClickMe-like benchmark: file contracts, determinism, and its design."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from advalign import columns
from advalign.config import load_config
from advalign.data.synthetic import (
    SPEC_DEFAULTS,
    _world,
    class_contexts,
    class_glyphs,
    class_table,
    generate_split,
    render_image,
    write_synthetic_dataset,
)
from advalign.io import PipelineError

SMALL = {
    "n_classes": 4,
    "image_size": 32,
    "train_per_class": 6,
    "heldout_per_class": 3,
    "stimuli_per_class": 2,
    "conflict_per_class": 2,
    "map_fraction": 0.5,
}


def _outputs(folder):
    paths = {split: folder / f"{split}.npz" for split in (*columns.SPLITS, columns.CONFLICT_SPLIT)}
    paths.update(classes=folder / "classes.csv", manifest=folder / "stimuli_manifest.csv")
    return paths


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    outputs = _outputs(folder)
    write_synthetic_dataset(SMALL, seed=3, outputs=outputs)
    return outputs


def test_splits_follow_the_contract(written):
    sizes = {"train": 6, "heldout": 3, "stimuli": 2}
    all_ids = []
    for split, per_class in sizes.items():
        with np.load(written[split], allow_pickle=False) as data:
            assert sorted(data.files) == sorted(columns.SPLIT_ARRAYS)
            images, labels, maps = data["images"], data["labels"], data["maps"]
            has_map, ids = data["has_map"], data["ids"]
        n = 4 * per_class
        assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert np.bincount(labels, minlength=4).tolist() == [per_class] * 4  # balanced
        assert maps.shape == (n, 32, 32) and maps.dtype == np.float32
        assert has_map.dtype == bool
        assert maps.min() >= 0 and maps.max() <= 1
        np.testing.assert_allclose(maps[has_map].max(axis=(1, 2)), 1.0)  # max-normalised
        assert not maps[~has_map].any()  # zeros where there is no map
        assert ids.dtype.kind == "U" and len(set(ids)) == n
        all_ids += list(ids)
        if split != "train":
            assert has_map.all()  # every held-out image and stimulus has its map
        else:
            assert has_map.sum() == 12  # map_fraction 0.5 of 24
    assert len(set(all_ids)) == len(all_ids)  # ids are unique across splits
    with np.load(written["stimuli"]) as data:
        assert data["ids"][0] == "stim_00000"


def test_classes_and_manifest_follow_the_contract(written):
    classes = pd.read_csv(written["classes"])
    assert list(classes.columns) == list(columns.CLASS_COLUMNS)
    assert classes["class_index"].tolist() == [0, 1, 2, 3]
    assert classes["animate"].tolist() == [True, True, False, False]
    assert classes["class_name"].is_unique
    manifest = pd.read_csv(written["manifest"], keep_default_na=False)
    assert list(manifest.columns) == list(columns.MANIFEST_COLUMNS)
    with np.load(written["stimuli"]) as data:
        assert manifest["image_id"].tolist() == data["ids"].tolist()
        assert manifest["class_index"].tolist() == data["labels"].tolist()
    names = dict(zip(classes["class_index"], classes["class_name"]))
    assert (manifest["class_name"] == manifest["class_index"].map(names)).all()
    assert manifest["source"].str.startswith("synthetic;context=").all()


def test_same_seed_gives_byte_identical_files(written, tmp_path):
    again = _outputs(tmp_path / "again")
    write_synthetic_dataset(SMALL, seed=3, outputs=again)
    for key in written:
        assert again[key].read_bytes() == written[key].read_bytes(), key
    other = _outputs(tmp_path / "other")
    write_synthetic_dataset(SMALL, seed=4, outputs=other)
    with np.load(other["train"]) as a, np.load(written["train"]) as b:
        assert not np.array_equal(a["images"], b["images"])


def test_human_map_marks_the_part_that_decides_the_class():
    spec = {**SPEC_DEFAULTS, "noise_std": 0.0}
    world = _world(10)
    for seed in range(5):
        # Same draws, same context, two animate classes: only the part (glyph and skin) differs.
        first, human = render_image(0, 7, np.random.default_rng(seed), world, spec)
        second, human_again = render_image(1, 7, np.random.default_rng(seed), world, spec)
        np.testing.assert_array_equal(human, human_again)
        changed = np.abs(first - second).max(axis=-1) > 1e-6
        assert changed.any()
        # Every pixel that carries the class is marked (the blurred map fades to ~0.38 at the part's corners).
        assert (human[changed] > 0.3).all() and (human[changed] > 0.5).mean() > 0.8
        assert 0.03 < (human > 0.5).mean() < 0.2  # a part, not the whole image
        # The context (not the class) draws the background: a different context changes it.
        other, _ = render_image(0, 8, np.random.default_rng(seed), world, spec)
        assert np.abs(other - first).max(axis=-1)[human < 0.01].mean() > 0.3 * spec["context_contrast"]


def test_context_agrees_with_the_class_at_the_configured_rate():
    spec = {**SMALL, "n_classes": 10, "heldout_per_class": 100}
    for agreement in (0.0, 0.8, 1.0):
        split = generate_split("heldout", {**spec, "context_agreement": agreement}, seed=1)
        rate = (split["context"] == split["labels"]).mean()
        assert rate == pytest.approx(agreement, abs=0.05)


def test_part_agrees_at_its_rate_independently_of_the_context():
    spec = {**SMALL, "n_classes": 10, "heldout_per_class": 200, "part_agreement": 0.7, "context_agreement": 0.95}
    split = generate_split("heldout", spec, seed=2)
    part_ok, context_ok = split["part"] == split["labels"], split["context"] == split["labels"]
    assert part_ok.mean() == pytest.approx(0.7, abs=0.04)
    assert context_ok.mean() == pytest.approx(0.95, abs=0.02)
    # Drawn independently: the part's rate is the same whether or not the context agrees.
    assert part_ok[context_ok].mean() == pytest.approx(part_ok.mean(), abs=0.04)
    # The glyph that a disagreeing part shows is never the label's own.
    assert (split["part"][~part_ok] != split["labels"][~part_ok]).all()


def test_conflict_set_puts_part_and_context_on_different_classes(written):
    with np.load(written["conflict"], allow_pickle=False) as data:
        assert sorted(data.files) == sorted(columns.CONFLICT_ARRAYS)
        part, context, labels = data["part"], data["context"], data["labels"]
        assert data["has_map"].all() and data["images"].shape == (8, 32, 32, 3)
    assert (part == labels).all() and (part != context).all()
    assert np.bincount(part, minlength=4).tolist() == [2] * 4
    big = generate_split("conflict", {**SMALL, "n_classes": 10, "conflict_per_class": 50}, seed=0)
    assert (big["part"] != big["context"]).all()
    assert len(set(zip(big["part"].tolist(), big["context"].tolist()))) > 60  # many class pairs


def test_a_part_of_another_class_draws_that_class_glyph_and_colour():
    spec = {**SPEC_DEFAULTS, "noise_std": 0.0}
    world = _world(10)
    own, human = render_image(2, 2, np.random.default_rng(0), world, spec)
    swapped, _ = render_image(2, 2, np.random.default_rng(0), world, spec, part_class=3)
    shown, _ = render_image(3, 2, np.random.default_rng(0), world, spec)
    changed = np.abs(own - swapped).max(axis=-1) > 1e-6
    assert changed.any() and (human[changed] > 0.3).all()
    part = human > 0.9
    # Classes 2 and 3 are both animate: the body is the same, and the part is class 3's.
    np.testing.assert_allclose(swapped[part], shown[part], atol=1e-6)


def test_class_world_is_mirror_safe_and_animate_half_and_half():
    glyphs = class_glyphs(10)
    assert glyphs.shape[0] == 10
    # Left-right symmetric, so random flips during training never change a glyph's class.
    assert np.array_equal(glyphs, glyphs[:, :, ::-1])
    distances = [(glyphs[i] != glyphs[j]).sum() for i in range(10) for j in range(i + 1, 10)]
    assert min(distances) >= 2
    contexts = class_contexts(10)
    assert len({(c["kind"], c["cycles"]) for c in contexts}) == 10
    table = class_table(10)
    assert table["animate"].sum() == 5
    assert {"monkey", "airplane"} <= set(table["class_name"])
    assert class_table(60)["class_name"].is_unique  # past the name lists, still unique


def test_default_config_matches_the_module_defaults():
    from advalign.config import load_schema

    schema = load_schema()
    properties = schema["properties"]["data"]["properties"]["synthetic"]["properties"]
    assert {key: properties[key]["default"] for key in properties} == SPEC_DEFAULTS
    config = load_config("config/config.yaml")
    assert set(config["data"]["synthetic"]) == set(SPEC_DEFAULTS)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image_size": 16}, "image_size must be >= 32"),
        ({"n_classes": 1}, "n_classes must be >= 2"),
        ({"context_agreement": 1.5}, "context_agreement must be in [0, 1]"),
        ({"part_agreement": -0.1}, "part_agreement must be in [0, 1]"),
        ({"conflict_per_class": 0}, "conflict_per_class must be >= 1"),
        ({"colour": 1}, "unknown key(s) colour"),
    ],
)
def test_bad_spec_is_a_one_line_error(tmp_path, change, message):
    with pytest.raises(PipelineError, match=None) as error:
        write_synthetic_dataset({**SMALL, **change}, seed=0, outputs=_outputs(tmp_path))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_missing_output_path_is_an_error(tmp_path):
    outputs = _outputs(tmp_path)
    del outputs["manifest"]
    with pytest.raises(PipelineError, match="manifest"):
        write_synthetic_dataset(SMALL, seed=0, outputs=outputs)


FIRST_WORLD = {"part_agreement": 1.0, "part_tint": 0.0, "context_agreement": 0.8, "context_tint": 0.4,
               "context_contrast": 0.2}


def test_the_first_demo_world_is_still_one_setting_away(tmp_path):
    """With the part always agreeing, no part colour and the old tinted context, the generator
    writes the first demo world's files byte for byte (digests recorded from that generator)."""
    import hashlib

    outputs = _outputs(tmp_path)
    spec = {"n_classes": 4, "train_per_class": 40, "heldout_per_class": 12, "stimuli_per_class": 2, **FIRST_WORLD}
    write_synthetic_dataset(spec, seed=0, outputs=outputs)
    digest = {k: hashlib.sha256(outputs[k].read_bytes()).hexdigest() for k in ("train", "stimuli")}
    assert digest == {
        "train": "879cbf830c8efbf3b062ce794802759653f35d73bfdee1f78da135d8d9136bde",
        "stimuli": "6e2cff4195ce8bf3c1a05d024467840bbc92901c4f2e8d18f593b6f6855943ab",
    }
