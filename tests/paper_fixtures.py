"""Tiny paper-mode inputs in their real formats, built in temporary folders.

ClickMe shards are written with the PyPI ``tfrecord`` package (its own protobuf
``Example`` classes and the ``crc32c`` package), independently of the reader under
test; images are real JPEGs encoded by Pillow.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from advalign.data.imagenet import imagenet_classes


def jpeg_bytes(array: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def clickme_arrays(label: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A smooth RGB image and a heatmap with one bright blob, both uint8."""
    rng = np.random.default_rng([label, seed])
    yy, xx = np.mgrid[0:size, 0:size] / size
    colour = rng.uniform(40, 215, size=3)
    image = np.clip(colour + 30 * np.sin(6 * xx + label)[..., None] + rng.normal(0, 3, (size, size, 3)), 0, 255)
    cy, cx = rng.uniform(0.25, 0.75, size=2)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.01)
    return image.astype(np.uint8), (255 * blob).astype(np.uint8)


def clickme_datum(label: int, seed: int, size: int = 32, image: bytes | None = None, heatmap: bytes | None = None):
    """One record for tfrecord.writer.TFRecordWriter.write (the docs/methods.md §2 features)."""
    rgb, heat = clickme_arrays(label, seed, size)
    return {
        "image": (jpeg_bytes(rgb) if image is None else image, "byte"),
        "heatmap": (jpeg_bytes(heat) if heatmap is None else heatmap, "byte"),
        "label": (label, "int"),
    }


def write_shard(path: Path, data: list[dict]) -> Path:
    from tfrecord.writer import TFRecordWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = TFRecordWriter(str(path))
    try:
        for datum in data:
            writer.write(datum)
    finally:
        writer.close()
    return path


def write_clickme_shards(
    folder: Path, prefix: str, labels_per_shard: list[list[int]], size: int = 32, seed: int = 0
) -> list[Path]:
    """Shards ``{prefix}-{i}.tfrecords``, shard i holding one record per label in labels_per_shard[i]."""
    paths = []
    for i, labels in enumerate(labels_per_shard):
        data = [clickme_datum(label, seed=1000 * i + k + seed, size=size) for k, label in enumerate(labels)]
        paths.append(write_shard(folder / f"{prefix}-{i}.tfrecords", data))
    return paths


def build_imagenet_class_folders(root: Path, class_indices: list[int], per_class: int = 2, size: int = 24) -> Path:
    wnids = imagenet_classes()["wordnet_id"]
    for c in class_indices:
        folder = root / wnids[c]
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            rgb, _ = clickme_arrays(c, k, size)
            (folder / f"ILSVRC2012_val_{c:05d}{k:03d}.JPEG").write_bytes(jpeg_bytes(rgb))
    return root


def build_imagenet_flat(root: Path, labels: dict[str, int], size: int = 24) -> Path:
    """Flat layout: ``root/<name>.JPEG`` for each name in ``labels`` (name -> class index)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, c in labels.items():
        rgb, _ = clickme_arrays(c, len(name), size)
        (root / f"{name}.JPEG").write_bytes(jpeg_bytes(rgb))
    return root


def paper_data(tmp: Path, stimulus_classes: list[int], train_classes: list[int] | None = None) -> dict:
    """A complete tiny paper data set; returns the ``data.paper`` config mapping pointing at it."""
    clickme = tmp / "clickme"
    # Two val shards; every stimulus class has 2-3 candidates spread over them.
    write_clickme_shards(clickme, "val", [stimulus_classes + stimulus_classes[::2], stimulus_classes])
    write_clickme_shards(clickme, "train", [train_classes or stimulus_classes])
    build_imagenet_class_folders(tmp / "imagenet" / "train", train_classes or stimulus_classes)
    build_imagenet_class_folders(tmp / "imagenet" / "val", stimulus_classes, per_class=1)
    return {
        "clickme": {"shard_dir": str(clickme), "fetch": {"base_url": None}},  # placed by hand: no network
        "imagenet": {"train_dir": str(tmp / "imagenet" / "train"), "val_dir": str(tmp / "imagenet" / "val")},
        "stimuli": {"classes": list(stimulus_classes), "image_size": 64},
        "weights_cache": str(tmp / "weights"),
    }
