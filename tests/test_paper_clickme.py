"""ClickMe shards: indexing, decoding, one-line errors, and the docs/methods.md §2 preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from advalign.data.clickme import (
    blur_map,
    clickme_preprocess,
    find_shards,
    gaussian_kernel,
    index_shard,
    read_clickme_record,
)
from advalign.io import PipelineError
from paper_fixtures import clickme_arrays, clickme_datum, jpeg_bytes, write_clickme_shards, write_shard


def test_index_and_decode_round_trip(tmp_path):
    (shard,) = write_clickme_shards(tmp_path, "val", [[3, 998, 3]], size=40)
    records = index_shard(shard)
    assert [r.label for r in records] == [3, 998, 3]
    assert records[1].source == "val-0.tfrecords#1"
    assert records[1].image_id == "clickme_val-0_000001"
    image, heatmap = read_clickme_record(records[1])
    expected_image, expected_map = clickme_arrays(998, 1, 40)
    assert image.shape == (40, 40, 3) and image.dtype == np.uint8
    assert heatmap.shape == (40, 40) and heatmap.dtype == np.uint8
    # JPEG is lossy: close, not equal.
    assert np.abs(image.astype(int) - expected_image).mean() < 4
    assert np.abs(heatmap.astype(int) - expected_map).mean() < 4


def test_find_shards_sorts_naturally_and_needs_every_pattern(tmp_path):
    write_clickme_shards(tmp_path, "train", [[1]] * 11)
    write_clickme_shards(tmp_path, "val", [[1]])
    shards = find_shards(tmp_path, ["train-*.tfrecords", "val-*.tfrecords"])
    assert [p.name for p in shards[:3]] == ["train-0.tfrecords", "train-1.tfrecords", "train-2.tfrecords"]
    assert shards[-1].name == "val-0.tfrecords" and len(shards) == 12
    with pytest.raises(PipelineError, match=r"test-\*.tfrecords: no ClickMe shard matches"):
        find_shards(tmp_path, ["val-*.tfrecords", "test-*.tfrecords"])
    with pytest.raises(PipelineError, match="ClickMe shard folder not found"):
        find_shards(tmp_path / "nowhere", ["val-*.tfrecords"])


def test_record_without_a_map_is_an_error(tmp_path):
    datum = clickme_datum(5, 0)
    del datum["heatmap"]
    shard = write_shard(tmp_path / "val-0.tfrecords", [datum])
    (record,) = index_shard(shard)
    with pytest.raises(PipelineError, match=r"val-0.tfrecords: record 0: record has no human map") as info:
        read_clickme_record(record)
    assert "\n" not in str(info.value)


def test_corrupt_jpeg_is_an_error(tmp_path):
    good = jpeg_bytes(clickme_arrays(5, 0)[0])
    shard = write_shard(tmp_path / "val-0.tfrecords", [clickme_datum(5, 0, image=good[: len(good) // 2])])
    (record,) = index_shard(shard)
    with pytest.raises(PipelineError, match=r"record 0 'image': corrupt image data"):
        read_clickme_record(record)


def test_bad_labels_are_errors(tmp_path):
    datum = clickme_datum(5, 0)
    datum["label"] = (1000, "int")
    shard = write_shard(tmp_path / "val-0.tfrecords", [clickme_datum(1, 0), datum])
    with pytest.raises(PipelineError, match="record 1: label 1000 outside the ImageNet classes"):
        index_shard(shard)
    datum = clickme_datum(5, 0)
    del datum["label"]
    shard = write_shard(tmp_path / "val-1.tfrecords", [datum])
    with pytest.raises(PipelineError, match="record 0: no int64 'label' feature"):
        index_shard(shard)


def test_gaussian_kernel():
    kernel = gaussian_kernel(10, 10.0)
    assert kernel.shape == (10, 10)
    assert torch.isclose(kernel.sum(), torch.tensor(1.0))
    assert torch.allclose(kernel, kernel.T) and torch.allclose(kernel, kernel.flip(0).flip(1))
    assert kernel.max() / kernel.min() < 1.6  # sigma 10 over 10 taps: nearly flat


def test_blur_is_a_same_padded_correlation():
    """The blur, against its definition written out as loops (TensorFlow 'SAME' padding)."""
    rng = np.random.default_rng(1)
    image = rng.random((13, 11)).astype(np.float32)
    size, sigma = 4, 1.5
    kernel = gaussian_kernel(size, sigma).numpy()
    before = (size - 1) // 2
    expected = np.zeros_like(image)
    for y in range(13):
        for x in range(11):
            for j in range(size):
                for i in range(size):
                    yy, xx = y + j - before, x + i - before
                    if 0 <= yy < 13 and 0 <= xx < 11:
                        expected[y, x] += kernel[j, i] * image[yy, xx]
    got = blur_map(torch.from_numpy(image)[None, None], size, sigma)[0, 0].numpy()
    assert np.allclose(got, expected, atol=1e-5)


def test_preprocess_follows_spec_defaults():
    image, heatmap = clickme_arrays(7, 0, size=256)
    out_image, out_map = clickme_preprocess(image, heatmap)
    assert out_image.shape == (224, 224, 3) and out_image.dtype == np.uint8
    assert out_map.shape == (224, 224) and out_map.dtype == np.float32
    assert out_map.min() >= 0 and out_map.max() == pytest.approx(1.0)
    # The blurred map is smooth and peaks near the heatmap's blob.
    peak = np.unravel_index(out_map.argmax(), out_map.shape)
    blob = np.unravel_index(heatmap.argmax(), heatmap.shape)
    assert np.hypot(peak[0] - blob[0] * 224 / 256, peak[1] - blob[1] * 224 / 256) < 20
    assert np.abs(np.diff(out_map, axis=0)).max() < 0.05


def test_preprocess_at_native_size_keeps_the_image():
    image, heatmap = clickme_arrays(7, 0, size=256)
    out_image, out_map = clickme_preprocess(image, heatmap, image_size=256)
    assert np.array_equal(out_image, image)
    assert out_map.shape == (256, 256)


def test_single_click_spreads_and_empty_map_stays_empty():
    image = np.full((64, 64, 3), 128, np.uint8)
    clicks = np.zeros((64, 64), np.uint8)
    clicks[32, 32] = 255
    _, blurred = clickme_preprocess(image, clicks, image_size=64)
    assert (blurred > 0.5).sum() > 40  # one click became a blob of about the kernel's size
    _, empty = clickme_preprocess(image, np.zeros((64, 64), np.uint8), image_size=64)
    assert not empty.any()


def test_preprocess_rejects_wrong_shapes():
    with pytest.raises(PipelineError, match=r"image must be \[H, W, 3\]"):
        clickme_preprocess(np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))
    with pytest.raises(PipelineError, match="heatmap must be"):
        clickme_preprocess(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 2), np.uint8))
