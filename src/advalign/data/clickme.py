"""ClickMe human feature-importance maps, read from the harmonization TFRecord shards.

docs/methods.md §2: shards ``train-{i}.tfrecords`` and ``val-{i}.tfrecords``; each record is a
``tf.train.Example`` with ``image`` (JPEG, 256x256x3), ``heatmap`` (JPEG,
256x256x1) and ``label`` (int64, ImageNet class index). Records are read with
:mod:`advalign.data.tfrecord` (checksums verified) and decoded with Pillow.

:func:`clickme_preprocess` is the harmonization loader's preprocessing: the image
resized to 224, the heatmap resized to 64x64, blurred with a Gaussian (kernel 10,
sigma 10) and resized back to 224 -- with the output size a parameter, so the
stimuli can be kept at ClickMe's native 256 and leave every resize and crop to
each model's own transform (advalign.transforms.model_view).
"""

from __future__ import annotations

import glob
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..io import PipelineError
from .tfrecord import RecordSpan, iter_records, parse_example, read_record

FEATURES = ("image", "heatmap", "label")
NUM_CLASSES = 1000
SPEC_IMAGE_SIZE = 224  # the harmonization loader's output size
SPEC_MAP_SIZE = 64  # heatmaps are blurred at this resolution
SPEC_BLUR_KERNEL = 10
SPEC_BLUR_SIGMA = 10.0


@dataclass(frozen=True)
class ClickMeRecord:
    """One record of a shard, located well enough to be read again."""

    shard: Path
    span: RecordSpan
    label: int

    @property
    def source(self) -> str:
        return f"{self.shard.name}#{self.span.index}"

    @property
    def image_id(self) -> str:
        stem = self.shard.name.split(".")[0]
        return f"clickme_{stem}_{self.span.index:06d}"


def _natural_key(path: Path):
    # train-2 before train-10
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def find_shards(shard_dir: str | Path, patterns: list[str] | tuple[str, ...]) -> list[Path]:
    """The shards matching each glob pattern under ``shard_dir``; every pattern must match."""
    shard_dir = Path(shard_dir)
    if not shard_dir.is_dir():
        raise PipelineError(f"{shard_dir}: ClickMe shard folder not found")
    shards: list[Path] = []
    for pattern in patterns:
        matches = sorted((Path(p) for p in glob.glob(str(shard_dir / pattern))), key=_natural_key)
        matches = [p for p in matches if p.is_file()]
        if not matches:
            raise PipelineError(f"{shard_dir / pattern}: no ClickMe shard matches")
        shards.extend(p for p in matches if p not in shards)
    return shards


def _label_of(features: dict, where: str) -> int:
    values = features.get("label")
    if not values or not isinstance(values[0], int):
        raise PipelineError(f"{where}: no int64 'label' feature")
    label = values[0]
    if not 0 <= label < NUM_CLASSES:
        raise PipelineError(f"{where}: label {label} outside the ImageNet classes 0..{NUM_CLASSES - 1}")
    return label


def index_shard(path: str | Path, verify_crc: bool = True) -> list[ClickMeRecord]:
    """Every record of one shard with its label (images are not decoded)."""
    path = Path(path)
    records = []
    for span, payload in iter_records(path, verify_crc=verify_crc):
        where = f"{path}: record {span.index}"
        try:
            features = parse_example(payload)
        except ValueError as exc:
            raise PipelineError(f"{where}: {exc}") from None
        records.append(ClickMeRecord(path, span, _label_of(features, where)))
    return records


def _decode_jpeg(data: bytes, mode: str, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode now: a truncated or corrupt JPEG fails here, not later
            return np.asarray(image.convert(mode), dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise PipelineError(f"{where}: corrupt image data ({str(exc).splitlines()[0]})") from None


def decode_example(features: dict, where: str) -> tuple[np.ndarray, np.ndarray, int]:
    """``(image uint8 [H, W, 3], heatmap uint8 [h, w], label)`` of one parsed record."""
    for name in ("image", "heatmap"):
        values = features.get(name)
        if not values or not isinstance(values[0], bytes) or not values[0]:
            what = "human map" if name == "heatmap" else "image"
            raise PipelineError(f"{where}: record has no {what} (missing or empty '{name}' bytes feature)")
    image = _decode_jpeg(features["image"][0], "RGB", f"{where} 'image'")
    heatmap = _decode_jpeg(features["heatmap"][0], "L", f"{where} 'heatmap'")
    return image, heatmap, _label_of(features, where)


def read_clickme_record(record: ClickMeRecord, verify_crc: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Decode one indexed record: ``(image uint8 [H, W, 3], heatmap uint8 [h, w])``."""
    where = f"{record.shard}: record {record.span.index}"
    payload = read_record(record.shard, record.span, verify_crc=verify_crc)
    try:
        features = parse_example(payload)
    except ValueError as exc:
        raise PipelineError(f"{where}: {exc}") from None
    image, heatmap, label = decode_example(features, where)
    if label != record.label:
        raise PipelineError(f"{where}: label changed since the shard was indexed")
    return image, heatmap


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """Normalised 2-D Gaussian [size, size] centred on the kernel's middle."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    profile = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    kernel = torch.outer(profile, profile)
    return (kernel / kernel.sum()).float()


def blur_map(maps: torch.Tensor, size: int = SPEC_BLUR_KERNEL, sigma: float = SPEC_BLUR_SIGMA) -> torch.Tensor:
    """Gaussian blur of maps [N, 1, H, W] with zero 'same' padding, as a TensorFlow conv2d
    with padding='SAME' does (an even kernel gets the extra padding row/column after)."""
    before = (size - 1) // 2
    after = size - 1 - before
    padded = F.pad(maps, (before, after, before, after))
    return F.conv2d(padded, gaussian_kernel(size, sigma)[None, None].to(maps.dtype))


def _resize(tensor: torch.Tensor, size: int) -> torch.Tensor:
    # TensorFlow 2's tf.image.resize default: bilinear, half-pixel centres, no antialiasing.
    if tuple(tensor.shape[-2:]) == (size, size):
        return tensor
    return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def clickme_preprocess(
    image: np.ndarray,
    heatmap: np.ndarray,
    image_size: int = SPEC_IMAGE_SIZE,
    map_size: int = SPEC_MAP_SIZE,
    blur_kernel: int = SPEC_BLUR_KERNEL,
    blur_sigma: float = SPEC_BLUR_SIGMA,
) -> tuple[np.ndarray, np.ndarray]:
    """The ClickMe preprocessing of docs/methods.md §2 (defaults = the harmonization loader).

    image uint8 [H, W, 3] -> uint8 [image_size, image_size, 3] (bilinear resize);
    heatmap [h, w] -> resized to map_size x map_size, Gaussian-blurred (kernel
    ``blur_kernel``, sigma ``blur_sigma``, in map_size pixels), resized to
    image_size and max-normalised to [0, 1] (float32; all zeros stays all zeros).
    The low-resolution blur turns ClickMe's sparse clicks into a smooth density.
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise PipelineError(f"ClickMe image must be [H, W, 3], got {list(image.shape)}")
    if heatmap.ndim == 3 and heatmap.shape[-1] == 1:
        heatmap = heatmap[..., 0]
    if heatmap.ndim != 2:
        raise PipelineError(f"ClickMe heatmap must be [H, W] or [H, W, 1], got {list(heatmap.shape)}")
    x = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1)[None]  # a copy: the array may be read-only
    x = _resize(x, image_size).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    m = torch.tensor(np.asarray(heatmap), dtype=torch.float32)[None, None]
    m = _resize(blur_map(_resize(m, map_size), blur_kernel, blur_sigma), image_size)[0, 0].clamp(min=0.0)
    peak = float(m.max())
    m = m / peak if peak > 0 else m
    return np.ascontiguousarray(x), m.numpy().astype(np.float32)
