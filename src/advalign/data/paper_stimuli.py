"""The paper's stimulus set: ImageNet images with ClickMe maps, ``per_class`` per class.

docs/methods.md §2: 1000 ImageNet validation images that have ClickMe maps, one per
category, chosen at random with a seed. The ClickMe records carry the images, so
stimuli are drawn from the ClickMe shards directly:

1. every record of the stimulus shards is indexed (label and position only);
2. per class, the candidates (in shard and record order) are shuffled with a
   generator seeded by ``(seed, class_index)`` -- a class's choice does not
   depend on any other class -- and the first ``per_class`` whose map is not
   empty are taken;
3. each chosen record goes through :func:`~advalign.data.clickme.clickme_preprocess`
   at ``image_size`` (default 256, ClickMe's native size: the per-model resize
   and crop come later, from ``advalign.transforms.model_view``).

Writes the same three files as the synthetic rule (see advalign.columns):
``stimuli.npz`` (SPLIT_ARRAYS), ``classes.csv`` (CLASS_COLUMNS, all 1000
classes) and ``stimuli_manifest.csv`` (MANIFEST_COLUMNS). Everything is decoded
and checked before the first file is written, so an error leaves no output.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from ..columns import CLASS_COLUMNS, MANIFEST_COLUMNS, SPLIT_ARRAYS
from ..io import PipelineError, save_npz, write_table
from ..stimulus_file import check_stimulus_arrays
from .clickme import ClickMeRecord, clickme_preprocess, index_shard, read_clickme_record
from .imagenet import NUM_CLASSES, imagenet_classes

log = logging.getLogger(__name__)

DEFAULT_SPEC = {
    "per_class": 1,
    "classes": "all",
    "image_size": 256,
    "map_size": 64,
    "blur_kernel": 10,
    "blur_sigma": 10.0,
}


def requested_classes(classes) -> list[int]:
    """``"all"`` or a list of class indices -> sorted unique indices, checked."""
    if classes == "all":
        return list(range(NUM_CLASSES))
    chosen = sorted({int(c) for c in classes})
    bad = [c for c in chosen if not 0 <= c < NUM_CLASSES]
    if bad or not chosen:
        raise PipelineError(f"stimulus classes must be 'all' or indices 0..{NUM_CLASSES - 1}, got {classes!r}")
    return chosen


def index_records(shards: list[Path], verify_crc: bool = True) -> dict[int, list[ClickMeRecord]]:
    """Records of every shard grouped by class, each group in shard then record order."""
    by_class: dict[int, list[ClickMeRecord]] = defaultdict(list)
    for shard in shards:
        records = index_shard(shard, verify_crc=verify_crc)
        log.info("%s: %d records", shard.name, len(records))
        for record in records:
            by_class[record.label].append(record)
    return by_class


def select_stimuli(by_class: dict[int, list[ClickMeRecord]], spec: dict, seed: int, verify_crc: bool = True):
    """Choose and preprocess the stimuli; returns (records, images, maps) in class order."""
    classes = imagenet_classes()
    per_class = int(spec["per_class"])
    chosen, images, maps = [], [], []
    for class_index in requested_classes(spec["classes"]):
        candidates = by_class.get(class_index, [])
        name = f"class {class_index} ({classes.at[class_index, 'wordnet_id']} {classes.at[class_index, 'class_name']})"
        if len(candidates) < per_class:
            raise PipelineError(
                f"{name}: {len(candidates)} ClickMe image(s) in the stimulus shards, {per_class} needed"
            )
        order = np.random.default_rng([int(seed), class_index]).permutation(len(candidates))
        taken = 0
        for position in order:
            record = candidates[position]
            image, heatmap = read_clickme_record(record, verify_crc=verify_crc)
            image, human_map = clickme_preprocess(
                image,
                heatmap,
                image_size=int(spec["image_size"]),
                map_size=int(spec["map_size"]),
                blur_kernel=int(spec["blur_kernel"]),
                blur_sigma=float(spec["blur_sigma"]),
            )
            if not human_map.any():
                log.warning("%s: empty human map, skipped", record.source)
                continue
            chosen.append(record)
            images.append(image)
            maps.append(human_map)
            taken += 1
            if taken == per_class:
                break
        if taken < per_class:
            raise PipelineError(f"{name}: only {taken} ClickMe image(s) with a non-empty map, {per_class} needed")
    return chosen, images, maps


def stimulus_tables(records: list[ClickMeRecord]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(classes.csv, stimuli_manifest.csv) frames for the chosen records."""
    table = imagenet_classes()
    classes = table[list(CLASS_COLUMNS)].copy()
    labels = np.array([r.label for r in records], dtype=np.int64)
    manifest = pd.DataFrame(
        {
            "image_id": [r.image_id for r in records],
            "class_index": labels,
            "wordnet_id": table["wordnet_id"].to_numpy()[labels],
            "class_name": table["class_name"].to_numpy()[labels],
            "animate": table["animate"].to_numpy()[labels],
            "source": [r.source for r in records],
        },
        columns=list(MANIFEST_COLUMNS),
    )
    return classes, manifest


def write_paper_stimuli(shards, spec: dict, seed: int, outputs: dict, verify_crc: bool = True) -> pd.DataFrame:
    """Select the stimuli from the ClickMe ``shards`` and write the three stimulus files.

    ``shards`` are paths (see :func:`~advalign.data.clickme.find_shards` for globbing);
    ``outputs`` maps ``stimuli``, ``classes`` and ``manifest`` to paths. Returns the manifest.
    """
    spec = {**DEFAULT_SPEC, **spec}
    shards = [Path(s) for s in shards]
    if not shards:
        raise PipelineError("no ClickMe stimulus shards given")
    for shard in shards:
        if not shard.is_file():
            raise PipelineError(f"{shard}: ClickMe shard not found")
    by_class = index_records(shards, verify_crc=verify_crc)
    log.info("%d records in %d shards, %d classes", sum(map(len, by_class.values())), len(shards), len(by_class))
    records, images, maps = select_stimuli(by_class, spec, seed, verify_crc=verify_crc)
    ids = [r.image_id for r in records]
    if len(set(ids)) != len(ids):
        raise PipelineError("two stimulus shards share a file name; stimulus ids would repeat")
    arrays = {
        "images": np.stack(images).astype(np.uint8),
        "labels": np.array([r.label for r in records], dtype=np.int64),
        "maps": np.stack(maps).astype(np.float32),
        "has_map": np.ones(len(records), dtype=bool),
        "ids": np.array(ids),
    }
    classes, manifest = stimulus_tables(records)
    check_stimulus_arrays(arrays, f"{outputs['stimuli']} (not written)")  # a map with NaN never reaches a job
    save_npz(Path(outputs["stimuli"]), **{name: arrays[name] for name in SPLIT_ARRAYS})
    write_table(classes, Path(outputs["classes"]))
    write_table(manifest, Path(outputs["manifest"]))
    log.info("%d stimuli from %d classes written", len(records), manifest["class_index"].nunique())
    return manifest
