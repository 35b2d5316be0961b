"""Measured cue reliance: the known answer of the synthetic benchmark (docs/methods.md §7).

On the synthetic world a model can decide from the human-marked part (the glyph) or from
the background context, which humans do not mark. Two measurements say which it uses:

* **Cue conflict** (``results/data/conflict.npz``): every image's part shows one class and
  its context another. ``part_reliance`` = decisions that follow the part / decisions
  that follow either cue; ``n_conflict_other`` counts decisions for neither.
* **Occlusion** (the attacked stimuli, all with a map): accuracy with the human-marked
  region replaced by noise (``accuracy_part_occluded``) and with everything outside it
  replaced (``accuracy_context_occluded``). The region is where the human map is at least
  OCCLUSION_THRESHOLD; the noise is the image's own per-channel mean plus Gaussian noise of
  the image's own per-channel standard deviation, drawn from a generator seeded per image.

All accuracies are fractions in [0, 1] of the images of the set (n_conflict, n_stimuli).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .columns import CONFLICT_ARRAYS, RELIANCE_COLUMNS
from .io import PipelineError
from .models import attacked_model
from .stimulus_file import load_stimulus_file
from .transforms import resize_and_crop

log = logging.getLogger(__name__)

OCCLUSION_THRESHOLD = 0.5  # human map (max-normalised to 1) at or above this = the marked region
OCCLUSION_SEED = 20240229


def load_conflict_set(path) -> dict:
    """The cue-conflict NPZ (columns.CONFLICT_ARRAYS), checked as the stimuli are."""
    data = load_stimulus_file(path, CONFLICT_ARRAYS, "cue-conflict set")
    if (data["part"] == data["context"]).any():
        raise PipelineError(f"{path}: some images have part and context of the same class (not a conflict set)")
    return data


def load_stimulus_set(path) -> dict:
    """The stimuli NPZ (columns.SPLIT_ARRAYS), checked (shapes, finite maps) by the one reader
    every stage uses (advalign.stimulus_file), not through the attack code, so that an attack
    edit does not re-measure reliance (advalign.provenance)."""
    return load_stimulus_file(path)


@torch.no_grad()
def predict(net, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """Class predictions of ``net`` (a NormalizedModel) on uint8 [N, H, W, 3] or float [0, 1]
    images, brought to the model's input through its data config as the attacks bring them
    (advalign.transforms)."""
    config = getattr(net, "data_config", None)
    predictions = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        x = torch.tensor(np.asarray(chunk), dtype=torch.float32).permute(0, 3, 1, 2)  # a copy: may be read-only
        if chunk.dtype == np.uint8:
            x = x / 255.0
        if config:
            x = resize_and_crop(x, tuple(config["input_size"][-2:]), float(config.get("crop_pct", 1.0) or 1.0),
                                config.get("interpolation", "bilinear")).clamp_(0.0, 1.0)  # fmt: skip
        predictions.append(net(x).argmax(1).cpu().numpy())
    return np.concatenate(predictions)


def occluded(images: np.ndarray, maps: np.ndarray, inside: bool, seed: int = OCCLUSION_SEED) -> np.ndarray:
    """float32 [N, H, W, 3] in [0, 1]: ``images`` with the marked region (``inside``) or everything
    outside it replaced by noise matched to each image's per-channel mean and standard deviation."""
    pixels = images.astype(np.float32) / 255.0
    region = maps >= OCCLUSION_THRESHOLD
    if not inside:
        region = ~region
    out = pixels.copy()
    for i in range(len(pixels)):
        rng = np.random.default_rng([seed, int(inside), i])
        mean = pixels[i].reshape(-1, 3).mean(0)
        std = pixels[i].reshape(-1, 3).std(0)
        noise = np.clip(mean + std * rng.standard_normal(pixels[i].shape), 0.0, 1.0).astype(np.float32)
        out[i][region[i]] = noise[region[i]]
    return out


def cue_scores(predictions: np.ndarray, part: np.ndarray, context: np.ndarray) -> dict:
    follows_part = int((predictions == part).sum())
    follows_context = int((predictions == context).sum())
    either = follows_part + follows_context
    return {
        "part_reliance": follows_part / either if either else math.nan,
        "n_conflict": len(predictions),
        "n_conflict_part": follows_part,
        "n_conflict_context": follows_context,
        "n_conflict_other": len(predictions) - either,
    }


def model_reliance(net, conflict: dict, stimuli: dict) -> dict:
    """One RELIANCE_COLUMNS row (without ``model``) for one attacked function."""
    scores = cue_scores(predict(net, conflict["images"]), conflict["part"], conflict["context"])
    labels = stimuli["labels"]
    with_map = stimuli["has_map"].astype(bool)
    images, maps, labels = stimuli["images"][with_map], stimuli["maps"][with_map], labels[with_map]
    return {
        **scores,
        "accuracy_stimuli": float((predict(net, images) == labels).mean()),
        "accuracy_part_occluded": float((predict(net, occluded(images, maps, inside=True)) == labels).mean()),
        "accuracy_context_occluded": float((predict(net, occluded(images, maps, inside=False)) == labels).mean()),
        "n_stimuli": len(labels),
    }


def reliance_table(zoo_rows: list[dict], weights_paths, conflict_path, stimuli_path, device="cpu") -> pd.DataFrame:
    """RELIANCE_COLUMNS, one row per model (in ``zoo_rows`` order); weights at
    ``results/models/{model}/weights.pt``."""
    conflict = load_conflict_set(conflict_path)
    stimuli = load_stimulus_set(stimuli_path)
    paths = {Path(p).parent.name: Path(p) for p in weights_paths}
    missing = [row["model"] for row in zoo_rows if row["model"] not in paths]
    if missing:
        raise PipelineError(f"cue reliance: no weights for model(s) {', '.join(missing)}")
    records = []
    for row in tqdm(zoo_rows, desc="cue reliance", unit="model"):
        net, _ = attacked_model(paths[row["model"]], row, device=device)
        record = {"model": row["model"], **model_reliance(net, conflict, stimuli)}
        log.info(
            "%s: part reliance %.3f (%d part / %d context / %d other of %d conflict images); stimuli accuracy "
            "%.3f, part occluded %.3f, context occluded %.3f",
            row["model"], record["part_reliance"], record["n_conflict_part"], record["n_conflict_context"],
            record["n_conflict_other"], record["n_conflict"], record["accuracy_stimuli"],
            record["accuracy_part_occluded"], record["accuracy_context_occluded"],
        )  # fmt: skip
        records.append(record)
    return pd.DataFrame(records, columns=list(RELIANCE_COLUMNS))
