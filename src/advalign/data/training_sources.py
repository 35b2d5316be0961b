"""Where training images come from: the pluggable data sources of :mod:`advalign.training`.

A *data source* is anything with

* ``num_classes`` and ``len(source)`` (the number of images of an epoch);
* ``load(indices, epoch, seed, flip) -> Batch``: the images at ``indices`` in [0, 1] at the
  model's input size, their labels, human maps (zeros where ``has_map`` is False) and
  ``has_map``. Augmentation is a pure function of ``(seed, epoch, image index)``, so a batch
  is the same whichever process, data-loader worker or resumed run loads it.

Two sources exist:

* :class:`ArraySource` -- one split NPZ of the synthetic benchmark held in memory;
* :class:`ImageNetClickMeSource` -- the paper's training set: every image of the ImageNet
  index CSV (``results/data/imagenet_train.csv``, no human map) plus every record of the
  ClickMe training shards (image *and* map, docs/methods.md §2). ClickMe images are ImageNet training
  images, but its records carry no file name, so the two cannot be matched: the source is
  their union, as in the original release, where an image with a ClickMe map is a separate
  sample from the same image in ImageNet. The same class with no shards is the ImageNet
  validation set that measures a trained model's top-1.

Images and maps go through one spatial transform (the model's resize and centre crop from
its data config, then the left-right flip): docs/methods.md §2. The paper names no random crop for
harmonizer training (flips and mixup only), so none is applied.

:class:`EpochSampler` orders an epoch and splits its *global* batches over the processes of
a distributed run; :func:`mixup` mixes a batch (see its docstring for ``has_map`` under mixup).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..columns import IMAGENET_INDEX_COLUMNS, SPLIT_ARRAYS
from ..io import PipelineError
from ..transforms import resize_and_crop

# ---------------------------------------------------------------------------
# Batches and seeds
# ---------------------------------------------------------------------------


@dataclass
class Batch:
    pixels: torch.Tensor  # float [B, 3, H, W] in [0, 1]
    labels: torch.Tensor  # int64 [B]
    maps: torch.Tensor  # float [B, H, W] human maps (zeros where has_map is False)
    has_map: torch.Tensor  # bool [B]
    # Mixup (see :func:`mixup`): the partner's labels and the weight of ``labels``.
    mix_labels: torch.Tensor | None = None
    mix_weight: float = 1.0

    def to(self, device) -> "Batch":
        moved = {
            name: getattr(self, name).to(device, non_blocking=True)
            for name in ("pixels", "labels", "maps", "has_map")
        }
        mix = self.mix_labels.to(device, non_blocking=True) if self.mix_labels is not None else None
        return Batch(**moved, mix_labels=mix, mix_weight=self.mix_weight)

    def pin_memory(self) -> "Batch":
        """Called by a DataLoader with pin_memory=True (GPU training)."""
        pinned = {name: getattr(self, name).pin_memory() for name in ("pixels", "labels", "maps", "has_map")}
        mix = self.mix_labels.pin_memory() if self.mix_labels is not None else None
        return Batch(**pinned, mix_labels=mix, mix_weight=self.mix_weight)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def derive_seed(seed: int, *stream: int) -> int:
    """A 63-bit seed for one stream (epoch, step, rank, purpose) of a run, stable across platforms."""
    return int(np.random.SeedSequence([int(seed), *map(int, stream)]).generate_state(1, np.uint64)[0] >> 1)


@lru_cache(maxsize=4)
def _epoch_draws(n: int, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
    order = torch.randperm(n, generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    return order, flips


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order in which epoch ``epoch`` visits images 0..n-1 (one generator per (seed, epoch))."""
    return _epoch_draws(n, seed, epoch)[0]


def epoch_flips(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Bool [n]: whether image i is mirrored in epoch ``epoch`` (same generator, after the order)."""
    return _epoch_draws(n, seed, epoch)[1]


# ---------------------------------------------------------------------------
# Sampling: global batches split over ranks, resumable within an epoch
# ---------------------------------------------------------------------------


class EpochSampler(DistributedSampler):
    """torch's DistributedSampler with the pipeline's epoch order and a resumable start.

    Epoch e visits ``epoch_order(n, seed, e)``; with ``world`` processes it is padded (by
    repeating its start, as DistributedSampler does) to a multiple of ``world`` and rank r
    takes every world-th index from r. Batched by ``global_batch / world`` on every rank,
    step g of the epoch therefore sees exactly the global batch ``order[g*B:(g+1)*B]`` --
    the same images a single process sees -- split over the ranks. ``set_epoch`` chooses
    the epoch, ``set_start`` skips the batches a resumed run has already done.
    """

    def __init__(self, n: int, global_batch: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        if global_batch % world_size:
            raise PipelineError(f"training.batch_size {global_batch} is not divisible by {world_size} processes")
        self.n = int(n)
        super().__init__(range(self.n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.local_batch = global_batch // world_size
        self.start_batch = 0

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_samples / self.local_batch)

    def set_start(self, batches_done: int) -> None:
        self.start_batch = int(batches_done)

    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch).tolist()
        padding = self.total_size - len(order)
        if padding > 0:
            order += (order * math.ceil(padding / len(order)))[:padding]
        mine = order[self.rank : self.total_size : self.num_replicas]
        return iter(mine[self.start_batch * self.local_batch :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_batch * self.local_batch)

    def batches(self) -> list[list[int]]:
        """This rank's remaining index batches of the current epoch."""
        mine = list(iter(self))
        return [mine[i : i + self.local_batch] for i in range(0, len(mine), self.local_batch)]


class _BatchView(Dataset):
    """Map-style view whose items are whole batches: a DataLoader with ``batch_size=None`` over
    a list of index lists gives one worker a whole batch to load."""

    def __init__(self, source, batches: list[list[int]], epoch: int, seed: int, flip: bool):
        self.source, self.index_batches = source, batches
        self.epoch, self.seed, self.flip = epoch, seed, flip

    def __len__(self) -> int:
        return len(self.index_batches)

    def __getitem__(self, i: int) -> Batch:
        return self.source.load(self.index_batches[i], self.epoch, self.seed, self.flip)


def _keep(batch):
    return batch


def batch_loader(source, batches: list[list[int]], epoch: int, seed: int, flip: bool, workers: int = 0,
                 generator_seed: int = 0, pin_memory: bool = False) -> DataLoader:  # fmt: skip
    """Load ``batches`` (lists of indices) in order, in ``workers`` background processes.

    The loader's own generator is seeded explicitly: a DataLoader otherwise draws its worker
    seed from the global torch generator, which would shift dropout and PGD starts after a
    resumed run re-creates the loader mid-epoch.
    """
    return DataLoader(
        _BatchView(source, batches, epoch, seed, flip),
        batch_size=None,
        shuffle=False,
        num_workers=int(workers),
        collate_fn=_keep,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(generator_seed),
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


# ---------------------------------------------------------------------------
# Mixup
# ---------------------------------------------------------------------------


def mixup(batch: Batch, alpha: float, seed: int, epoch: int, step: int, rank: int = 0) -> Batch:
    """Mixup (Zhang et al. 2017) that keeps the human maps meaningful.

    * One weight ``lam ~ Beta(alpha, alpha)`` per global step (drawn from (seed, epoch, step):
      the same on every rank); image i becomes ``lam * x_i + (1 - lam) * x_j``.
    * Its human map is mixed with the same coefficient, ``lam * h_i + (1 - lam) * h_j``, so the
      map follows the pixels it describes.
    * Partners are drawn *within the map-availability group*: an image with a map is mixed with
      another image with a map, one without with one without. ``has_map`` of a mixed image is
      therefore exactly ``has_map`` of both of its parts: the alignment term sees only mixed
      images whose whole content is covered by human maps, and no image with a map loses its
      term by being paired with one without (ClickMe covers ~13% of ImageNet, so a random
      partner would have a map only 13% of the time).
    * The loss uses both labels with the same weights: ``lam * CE(y_i) + (1 - lam) * CE(y_j)``
      and the saliency differentiates ``lam * logit_{y_i} + (1 - lam) * logit_{y_j}``
      (advalign.harmonizer).

    Partners are a random permutation within each group of this rank's part of the batch
    (seeded by (seed, epoch, step, rank)); an image may be its own partner.
    """
    if alpha <= 0:
        return batch
    lam = float(np.random.default_rng([int(seed), int(epoch), int(step), 7]).beta(alpha, alpha))
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, step, rank, 8))
    has_map = batch.has_map.cpu()
    partner = torch.arange(len(batch))
    for group in (has_map, ~has_map):
        members = group.nonzero().flatten()
        if members.numel():
            partner[members] = members[torch.randperm(members.numel(), generator=generator)]
    partner = partner.to(batch.labels.device)
    return replace(
        batch,
        pixels=lam * batch.pixels + (1.0 - lam) * batch.pixels[partner],
        maps=lam * batch.maps + (1.0 - lam) * batch.maps[partner],
        mix_labels=batch.labels[partner],
        mix_weight=lam,
    )


# ---------------------------------------------------------------------------
# The synthetic benchmark: one NPZ split in memory
# ---------------------------------------------------------------------------


class ArraySource:
    """One split NPZ (advalign.columns: images, labels, maps, has_map, ids) held in memory."""

    def __init__(self, path, num_classes: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise PipelineError(f"{self.path}: data split not found")
        try:
            with np.load(self.path, allow_pickle=False) as data:
                missing = [k for k in SPLIT_ARRAYS if k not in data.files]
                if missing:
                    raise PipelineError(f"{self.path}: missing array(s) {', '.join(missing)}")
                images, labels = data["images"], data["labels"]
                maps, has_map = data["maps"], data["has_map"]
        except (OSError, ValueError) as exc:
            raise PipelineError(f"{self.path}: not a readable NPZ ({exc})") from None
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise PipelineError(f"{self.path}: images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        n, height, width, _ = images.shape
        if labels.shape != (n,) or maps.shape != (n, height, width) or has_map.shape != (n,):
            raise PipelineError(f"{self.path}: labels/maps/has_map do not match {n} images of {height}x{width}")
        if n == 0:
            raise PipelineError(f"{self.path}: no images")
        if height != width:
            raise PipelineError(f"{self.path}: images must be square, got {height}x{width}")
        self.num_classes = int(num_classes if num_classes is not None else labels.max() + 1)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise PipelineError(f"{self.path}: labels outside 0..{self.num_classes - 1}")
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()  # uint8
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.maps = torch.from_numpy(maps.astype(np.float32))
        self.has_map = torch.from_numpy(has_map.astype(bool))
        self.image_size = int(height)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the pixels in [0, 1]: the normalisation trained models use."""
        pixels = self.images.double().div_(255.0)
        mean = pixels.mean(dim=(0, 2, 3))
        std = pixels.std(dim=(0, 2, 3))
        return tuple(mean.tolist()), tuple(std.tolist())

    def load(self, indices, epoch: int = 0, seed: int = 0, flip: bool = False) -> Batch:
        """The images at ``indices``; with ``flip``, those that :func:`epoch_flips` marks are
        mirrored together with their human maps (docs/methods.md §2: one spatial transform)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        pixels = self.images[index].float().div_(255.0)
        maps = self.maps[index].clone()
        if flip:
            mirror = epoch_flips(len(self), seed, epoch)[index]
            if bool(mirror.any()):
                pixels[mirror] = pixels[mirror].flip(-1)
                maps[mirror] = maps[mirror].flip(-1)
        return Batch(pixels, self.labels[index], maps, self.has_map[index])

    def batches(self, batch_size: int, epoch: int = 0, seed: int = 0, shuffle: bool = True, flip: bool = False):
        """Yield the Batches of one epoch in one process (order and flips depend only on (seed, epoch))."""
        order = epoch_order(len(self), seed, epoch) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            yield self.load(order[start : start + batch_size], epoch, seed, flip)


# ---------------------------------------------------------------------------
# The paper: ImageNet folders (index CSV) + ClickMe TFRecord shards
# ---------------------------------------------------------------------------


class ImageNetClickMeSource:
    """ImageNet images from an index CSV (IMAGENET_INDEX_COLUMNS; no human maps) followed by
    the records of ClickMe shards (with maps), each through the model's spatial transform.

    Samples 0..n_imagenet-1 are the index rows in file order, then the ClickMe records
    shard by shard in file order. ClickMe heatmaps get the harmonization loader's
    preprocessing (advalign.data.clickme.clickme_preprocess: 64 px, Gaussian blur, back to
    the record's size, max-normalised) before the shared resize/crop of image and map.
    """

    def __init__(self, index_csv, data_config: dict, clickme_shards=(), verify_crc: bool = True,
                 num_classes: int = 1000):  # fmt: skip
        from .tfrecord import scan_records

        self.index_csv = Path(index_csv)
        if not self.index_csv.is_file():
            raise PipelineError(f"{self.index_csv}: ImageNet index not found")
        index = pd.read_csv(self.index_csv, dtype={"path": str, "wordnet_id": str})
        missing = [c for c in IMAGENET_INDEX_COLUMNS if c not in index.columns]
        if missing:
            raise PipelineError(f"{self.index_csv}: missing column(s) {', '.join(missing)}")
        self.num_classes = int(num_classes)
        labels = index["class_index"].to_numpy(np.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise PipelineError(f"{self.index_csv}: class_index outside 0..{self.num_classes - 1}")
        self.paths = index["path"].to_numpy(object)
        self.labels = labels
        self.shards = [Path(p) for p in clickme_shards]
        spans = [(k, span) for k, shard in enumerate(self.shards) for span in scan_records(shard)]
        self.clickme = np.array([(k, s.index, s.offset, s.length) for k, s in spans], dtype=np.int64).reshape(-1, 4)
        if len(self) == 0:
            raise PipelineError(f"{self.index_csv}: no images to train or evaluate on")
        self.data_config = dict(data_config)
        self.verify_crc = bool(verify_crc)
        self.size = tuple(int(v) for v in self.data_config["input_size"][-2:])

    @property
    def n_imagenet(self) -> int:
        return len(self.paths)

    @property
    def n_clickme(self) -> int:
        return len(self.clickme)

    def __len__(self) -> int:
        return self.n_imagenet + self.n_clickme

    def _raw(self, i: int) -> tuple[np.ndarray, np.ndarray | None, int]:
        """uint8 image [H, W, 3], float map [H, W] in [0, 1] (None for ImageNet), label."""
        from .clickme import clickme_preprocess, decode_example
        from .imagenet import load_rgb
        from .tfrecord import RecordSpan, parse_example, read_record

        if i < self.n_imagenet:
            return load_rgb(self.paths[i]), None, int(self.labels[i])
        shard_k, record, offset, length = (int(v) for v in self.clickme[i - self.n_imagenet])
        shard = self.shards[shard_k]
        where = f"{shard}: record {record}"
        payload = read_record(shard, RecordSpan(record, offset, length), verify_crc=self.verify_crc)
        try:
            features = parse_example(payload)
        except ValueError as exc:
            raise PipelineError(f"{where}: {exc}") from None
        image, heatmap, label = decode_example(features, where)
        if label >= self.num_classes:
            raise PipelineError(f"{where}: label {label} outside 0..{self.num_classes - 1}")
        height, width = image.shape[:2]
        if height != width:
            raise PipelineError(f"{where}: ClickMe image is {height}x{width}, expected square")
        image, heat = clickme_preprocess(image, heatmap, image_size=height)
        return image, heat, label

    def load(self, indices, epoch: int = 0, seed: int = 0, flip: bool = False) -> Batch:
        indices = [int(i) for i in torch.as_tensor(indices).flatten().tolist()]
        mirror = epoch_flips(len(self), seed, epoch)[indices] if flip else torch.zeros(len(indices), dtype=torch.bool)
        crop_pct = float(self.data_config.get("crop_pct") or 1.0)
        interpolation = self.data_config.get("interpolation", "bilinear")
        pixels, maps, labels, has_map = [], [], [], []
        for k, i in enumerate(indices):
            image, heat, label = self._raw(i)
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div_(255.0)
            x = resize_and_crop(x, self.size, crop_pct, interpolation).clamp_(0.0, 1.0)[0]
            if heat is None:
                m = torch.zeros(self.size)
            else:
                # Maps are resampled bilinearly whatever the image interpolation: smooth densities.
                m = resize_and_crop(torch.from_numpy(heat)[None, None], self.size, crop_pct, "bilinear")[0, 0]
            if bool(mirror[k]):
                x, m = x.flip(-1), m.flip(-1)
            pixels.append(x)
            maps.append(m)
            labels.append(label)
            has_map.append(heat is not None)
        return Batch(
            torch.stack(pixels).contiguous(),
            torch.tensor(labels, dtype=torch.int64),
            torch.stack(maps).contiguous(),
            torch.tensor(has_map, dtype=torch.bool),
        )
