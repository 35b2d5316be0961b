"""Real photographs as a ClickMe-format stimulus shard: the real-model benchmark's data.

No ClickMe maps exist for the photographs that ship inside PyPI wheels (scikit-image's
``skimage/data``, matplotlib's ``sample_data``), so their "human maps" are made by a
documented rule, and are stated as such wherever they appear:

* a table (``data.paper.photos``, e.g. ``config/photos_real.csv``) names each photo, its
  file (``package:NAME/path`` or a path), the ImageNet class a person gives it, an optional
  ``crop`` region and one or more ``boxes`` around the object's diagnostic parts, drawn by
  hand in the photo's own pixels (``x0 y0 x1 y1``, several separated by ``;``);
* the crop (default: the whole photo) is resized to ClickMe's 256 x 256 (bicubic; a
  non-square crop is stretched, as a square ClickMe image would be), and the boxes are
  rasterised as a binary map (255 inside) through the same crop and resize;
* both are JPEG-encoded into one ``val-0.tfrecords`` shard with ClickMe's features
  (``image``, ``heatmap``, ``label``), so the paper's own stimulus selection reads them,
  and the ClickMe preprocessing blurs each box map like a click map (64 px, Gaussian
  kernel 10, sigma 10).

The table is checked while planning (:func:`read_photo_table`): a photo without a label,
a missing file or a box outside the photo is one line naming the table's line.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..io import PipelineError, atomic_path, resolve_source_path
from .imagenet import NUM_CLASSES
from .tfrecord import encode_example, frame_record

log = logging.getLogger(__name__)

PHOTO_COLUMNS = ("photo", "source", "label", "crop", "boxes", "note")
CLICKME_SIZE = 256
_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class Photo:
    photo: str
    path: Path
    label: int
    crop: tuple[int, int, int, int]
    boxes: tuple[tuple[int, int, int, int], ...]
    note: str


def _region(text: str, where: str, what: str) -> tuple[int, int, int, int]:
    parts = text.split()
    try:
        x0, y0, x1, y1 = (int(p) for p in parts)
    except ValueError:
        raise PipelineError(f"{where}: {what} {text.strip()!r} must be four integers 'x0 y0 x1 y1'") from None
    if not (x0 < x1 and y0 < y1):
        raise PipelineError(f"{where}: {what} {text.strip()!r} needs x0 < x1 and y0 < y1")
    return x0, y0, x1, y1


def read_photo_table(path) -> list[Photo]:
    """The photo table, every row checked; errors name the file's line."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: photo table not found (data.paper.photos)")
    with open(path, newline="") as fh:
        lines = [(number, line) for number, line in enumerate(fh, start=1) if line.strip() and not line.startswith("#")]
    if not lines:
        raise PipelineError(f"{path}: photo table is empty")
    rows = list(csv.reader([line for _, line in lines]))
    header = rows[0]
    if tuple(header) != PHOTO_COLUMNS:
        raise PipelineError(f"{path}: header must be {','.join(PHOTO_COLUMNS)} (got {','.join(header)})")
    photos, seen = [], set()
    for (number, _), row in zip(lines[1:], rows[1:]):
        name = row[0].strip() if row else ""
        where = f"{path}: line {number} ({name or '?'})"
        if len(row) != len(PHOTO_COLUMNS):
            raise PipelineError(f"{where}: {len(row)} fields, the header has {len(PHOTO_COLUMNS)}")
        photo, source, label, crop, boxes, note = (cell.strip() for cell in row)
        if not _ID.match(photo) or photo in seen:
            raise PipelineError(f"{where}: photo id must be unique and match {_ID.pattern}")
        seen.add(photo)
        if not label:
            raise PipelineError(f"{where}: no ImageNet label (label must be a class index 0..{NUM_CLASSES - 1})")
        if not label.isdigit() or not 0 <= int(label) < NUM_CLASSES:
            raise PipelineError(f"{where}: label {label!r} is not an ImageNet class index 0..{NUM_CLASSES - 1}")
        file = resolve_source_path(source, where, "photo")
        try:
            with Image.open(file) as image:
                width, height = image.size
        except OSError as exc:
            raise PipelineError(f"{where}: {file} is not a readable image ({exc})") from None
        region = _region(crop, where, "crop") if crop else (0, 0, width, height)
        if not boxes:
            raise PipelineError(f"{where}: no boxes (the hand-drawn object regions that make its map)")
        drawn = tuple(_region(box, where, "box") for box in boxes.split(";"))
        for x0, y0, x1, y1 in (region, *drawn):
            if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                raise PipelineError(f"{where}: region {x0} {y0} {x1} {y1} lies outside the {width}x{height} photo")
        photos.append(Photo(photo, file, int(label), region, drawn, note))
    if not photos:
        raise PipelineError(f"{path}: no photos")
    return photos


def photo_arrays(photo: Photo, size: int = CLICKME_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [size, size, 3], box map uint8 [size, size]) of one photo, same crop and resize."""
    with Image.open(photo.path) as image:
        rgb = image.convert("RGB")
    canvas = np.zeros((rgb.size[1], rgb.size[0]), dtype=np.uint8)
    for x0, y0, x1, y1 in photo.boxes:
        canvas[y0:y1, x0:x1] = 255
    mask = Image.fromarray(canvas)
    image = rgb.crop(photo.crop).resize((size, size), Image.Resampling.BICUBIC)
    heatmap = mask.crop(photo.crop).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image), np.asarray(heatmap)


def _jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_photo_shard(table_path, out_path, manifest_path=None) -> list[Photo]:
    """Write every photo of the table as one ClickMe-format TFRecord shard (atomically), and
    optionally a CSV listing record index, photo, label and note."""
    photos = read_photo_table(table_path)
    frames = []
    for photo in photos:
        image, heatmap = photo_arrays(photo)
        payload = encode_example({"image": [_jpeg(image)], "heatmap": [_jpeg(heatmap)], "label": [photo.label]})
        frames.append(frame_record(payload))
        log.info("%s: label %d, %d box(es), crop %s", photo.photo, photo.label, len(photo.boxes), photo.crop)
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(b"".join(frames))
    if manifest_path is not None:
        import pandas as pd

        from ..io import write_table

        write_table(pd.DataFrame({
            "record": range(len(photos)), "photo": [p.photo for p in photos], "label": [p.label for p in photos],
            "source": [str(p.path) for p in photos], "note": [p.note for p in photos],
        }), manifest_path)  # fmt: skip
    log.info("%d photos written to %s (maps: hand-drawn boxes, not human data)", len(photos), out_path)
    return photos
