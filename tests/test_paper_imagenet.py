"""ImageNet: the shipped class table, and both folder layouts of the readers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from advalign.columns import IMAGENET_INDEX_COLUMNS
from advalign.data.imagenet import (
    CLASS_TABLE_COLUMNS,
    build_class_table,
    class_folder_index,
    imagenet_classes,
    imagenet_index,
    load_rgb,
    write_imagenet_index,
)
from advalign.io import PipelineError
from paper_fixtures import build_imagenet_class_folders, build_imagenet_flat


def test_shipped_class_table_is_what_the_pinned_timm_generates():
    shipped = imagenet_classes()
    assert list(shipped.columns) == list(CLASS_TABLE_COLUMNS)
    pd.testing.assert_frame_equal(shipped, build_class_table(), check_dtype=False)


def test_class_table_order_and_animate_rule():
    table = imagenet_classes()
    assert list(table["class_index"]) == list(range(1000))
    assert table["wordnet_id"].is_unique and list(table["wordnet_id"]) == sorted(table["wordnet_id"])
    assert table.loc[0, ["wordnet_id", "class_name"]].tolist() == ["n01440764", "tench"]
    assert table.loc[397, "class_name"] == "puffer" and table.loc[398, "class_name"] == "abacus"
    assert table["animate"].sum() == 398
    assert table.loc[:397, "animate"].all() and not table.loc[398:, "animate"].any()
    # Spot checks of the rule against what the classes are.
    named = dict(zip(table["class_name"], table["animate"], strict=True))
    assert named["goldfish"] and named["tiger"] and named["golden retriever"]
    assert not named["abacus"] and not named["volcano"] and not named["toilet tissue"]


def test_class_folder_layout(tmp_path):
    root = build_imagenet_class_folders(tmp_path / "val", [0, 398, 999], per_class=2)
    (root / "n01440764" / "notes.txt").write_text("not an image")
    index = class_folder_index(root)
    assert list(index.columns) == list(IMAGENET_INDEX_COLUMNS)
    assert index["class_index"].tolist() == [0, 0, 398, 398, 999, 999]
    assert index["wordnet_id"].tolist()[:2] == ["n01440764"] * 2
    image = load_rgb(index["path"][0])
    assert image.shape == (24, 24, 3) and image.dtype == np.uint8


@pytest.mark.parametrize(
    "label_text",
    [
        "ILSVRC2012_val_00000001.JPEG n01440764\nILSVRC2012_val_00000002.JPEG n15075141\n",
        "ILSVRC2012_val_00000001 0\nILSVRC2012_val_00000002 999\n",
        # Kaggle's LOC_val_solution.csv: header, no extension, wnid first in the second column.
        "ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764 1 2 3 4\n"
        "ILSVRC2012_val_00000002,n15075141 5 6 7 8\n",
    ],
    ids=["wnid", "index", "kaggle"],
)
def test_flat_layout_with_label_file(tmp_path, label_text):
    root = build_imagenet_flat(tmp_path / "val", {"ILSVRC2012_val_00000001": 0, "ILSVRC2012_val_00000002": 999})
    labels = tmp_path / "labels.txt"
    labels.write_text(label_text)
    out = tmp_path / "index.csv"
    write_imagenet_index(root, labels, out)
    index = pd.read_csv(out)
    assert index["class_index"].tolist() == [0, 999]
    assert index["wordnet_id"].tolist() == ["n01440764", "n15075141"]


def test_layout_errors(tmp_path):
    root = build_imagenet_class_folders(tmp_path / "val", [1])
    (root / "cats").mkdir()
    with pytest.raises(PipelineError, match="cats: folder name is not an ImageNet-1k WordNet id"):
        imagenet_index(root)
    with pytest.raises(PipelineError, match="ImageNet folder not found"):
        imagenet_index(tmp_path / "missing")
    flat = build_imagenet_flat(tmp_path / "flat", {"a": 3, "b": 4})
    labels = tmp_path / "labels.txt"
    labels.write_text("a n01440764\n")
    with pytest.raises(PipelineError, match=r"b.JPEG: no label in"):
        imagenet_index(flat, labels)
    labels.write_text("65\n970\n")  # the devkit's ground truth: other class numbering
    with pytest.raises(PipelineError, match="devkit ground truth"):
        imagenet_index(flat, labels)
    labels.write_text("a n99999999\n")
    with pytest.raises(PipelineError, match="not an ImageNet-1k class"):
        imagenet_index(flat, labels)
    with pytest.raises(PipelineError, match="label file not found"):
        imagenet_index(flat, tmp_path / "nope.txt")


def test_corrupt_image_is_a_one_line_error(tmp_path):
    path = tmp_path / "broken.JPEG"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(PipelineError, match="broken.JPEG: cannot decode image") as info:
        load_rgb(path)
    assert "\n" not in str(info.value)
