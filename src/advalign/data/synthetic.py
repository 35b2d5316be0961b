"""The embedded synthetic benchmark: a seeded, ClickMe-like data set small enough for CPUs.

Every image shows one object: a body (an ellipse for animate classes, a box for
inanimate ones) with a small diagnostic *part* -- its "head" -- on top. The part
carries a class-specific glyph, and the glyph alone decides the class, just as a
face or a wheel does in ImageNet. The human feature-importance map marks that
part, Gaussian-blurred and max-normalised like a ClickMe map.

The background is a class-correlated *context*: a luminance texture (stripe
orientation and frequency) with a tint, drawn from the image's own class on
``context_agreement`` of the images and from another class otherwise. The
context is large, high-energy and learned first, so an ordinary model ends up
relying on it partly -- accurate, but for reasons a human would not give -- and
attacks on it spread over the background. A model trained to put its gradients
on the part (the neural harmonizer) is attacked on the part instead.

Two design choices keep the labels honest under the training stage's random
left-right flips: every glyph is left-right symmetric and every context texture
maps onto itself (up to phase) when mirrored. Contexts are luminance textures,
not pure hues, because adversarial alignment averages the perturbation over
colour channels; a purely chromatic context would be nearly invisible to it.

The classes (glyphs, context textures, tints) depend only on ``n_classes``; the
seed decides the sample. Same spec and seed -> byte-identical files.
"""

from __future__ import annotations

import colorsys
import io as _bytes_io
import math
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..columns import CLASS_COLUMNS, CONFLICT_ARRAYS, CONFLICT_SPLIT, MANIFEST_COLUMNS, SPLIT_ARRAYS, SPLITS
from ..io import PipelineError, atomic_path, write_table
from ..stimulus_file import check_stimulus_arrays

ANIMATE_NAMES = (
    "monkey", "owl", "frog", "tiger", "goldfish", "butterfly", "tortoise", "flamingo", "rabbit", "snake",
    "parrot", "elephant", "jellyfish", "beetle", "penguin", "fox", "crab", "bee", "horse", "lizard",
)  # fmt: skip
INANIMATE_NAMES = (
    "school_bus", "airplane", "teapot", "guitar", "alarm_clock", "sailboat", "umbrella", "bicycle", "desk_lamp",
    "piano", "mailbox", "tractor", "wristwatch", "kettle", "camera", "fire_truck", "lighthouse", "trumpet",
    "wheelbarrow", "windmill",
)  # fmt: skip

# The class "world" (glyphs, contexts) is fixed so that seeds resample the same task.
_WORLD_SEED = 20230711
_GLYPH_CELLS = 3  # glyphs are 3 x 3 cells (dark ink on a light "skin" square)
_PART_FRACTION = 0.3  # the part's side as a fraction of the image side
_CONTEXT_KINDS = ("horizontal", "vertical", "plaid", "diamond")  # all mirror-invariant up to phase
_SPLIT_PREFIX = {"train": "train", "heldout": "heldout", "stimuli": "stim", "conflict": "conflict"}
_OUTPUT_KEYS = ("train", "heldout", "stimuli", "conflict", "classes", "manifest")
SPEC_DEFAULTS = {
    "n_classes": 10,
    "image_size": 32,
    "train_per_class": 300,
    "heldout_per_class": 50,
    "stimuli_per_class": 10,
    "part_agreement": 0.7,
    "part_tint": 1.0,
    "context_agreement": 0.95,
    "context_tint": 0.0,
    "conflict_per_class": 30,
    "map_fraction": 1.0,
    "map_blur_sigma": 2.0,
    "context_contrast": 0.05,
    "noise_std": 0.03,
}


# ---------------------------------------------------------------------------
# The class world
# ---------------------------------------------------------------------------


def class_table(n_classes: int) -> pd.DataFrame:
    """CLASS_COLUMNS: the first half animate, the second half inanimate, with plausible names."""
    n_animate = (n_classes + 1) // 2
    names = []
    for group, count in ((ANIMATE_NAMES, n_animate), (INANIMATE_NAMES, n_classes - n_animate)):
        for k in range(count):
            # Past the name lists, numbered variants keep names unique (e.g. owl_2).
            base = group[k % len(group)]
            names.append(base if k < len(group) else f"{base}_{k // len(group) + 1}")
    return pd.DataFrame(
        {
            "class_index": np.arange(n_classes, dtype=np.int64),
            "class_name": names,
            "animate": [k < n_animate for k in range(n_classes)],
        },
        columns=list(CLASS_COLUMNS),
    )


def class_glyphs(n_classes: int) -> np.ndarray:
    """bool [n_classes, 3, 3]: left-right symmetric glyphs, pairwise far apart in Hamming distance.

    3 x 3 cells of ~3 px at 32 px: coarse enough that small CNNs learn the glyph within the
    demo's few epochs (finer 5 x 5 glyphs were not learned at all, leaving every model a
    pure context classifier)."""
    rng = np.random.default_rng([_WORLD_SEED, n_classes, 1])
    half = (_GLYPH_CELLS + 1) // 2
    chosen: list[np.ndarray] = []
    min_distance = max(2, _GLYPH_CELLS)
    while len(chosen) < n_classes:
        for _ in range(5000):
            left = rng.random((_GLYPH_CELLS, half)) < 0.5
            glyph = np.concatenate([left, left[:, : _GLYPH_CELLS - half][:, ::-1]], axis=1)
            on = glyph.sum()
            # Neither nearly empty nor nearly full, so every glyph has visible structure.
            if not 0.35 * glyph.size <= on <= 0.7 * glyph.size:
                continue
            if all((glyph != other).sum() >= min_distance for other in chosen):
                chosen.append(glyph)
                if len(chosen) == n_classes:
                    break
        else:
            min_distance -= 1  # many classes: relax the separation rather than loop forever
    return np.stack(chosen)


def class_contexts(n_classes: int) -> list[dict]:
    """One background context per class: texture kind, frequency (cycles per image) and tint."""
    contexts = []
    for c in range(n_classes):
        kind = _CONTEXT_KINDS[c % len(_CONTEXT_KINDS)]
        cycles = 2.5 + 2.0 * (c // len(_CONTEXT_KINDS))  # 2.5, 4.5, 6.5, ... cycles across the image
        hue = (c * 0.618034) % 1.0  # golden-ratio spacing keeps neighbouring classes' tints apart
        tint = np.array(colorsys.hsv_to_rgb(hue, 0.55, 1.0), dtype=np.float32)
        contexts.append({"kind": kind, "cycles": cycles, "tint": tint})
    return contexts


# ---------------------------------------------------------------------------
# Rendering one image
# ---------------------------------------------------------------------------


def _texture(kind: str, cycles: float, size: int, phase: tuple[float, float]) -> np.ndarray:
    """A zero-mean luminance texture in [-1, 1] of shape [size, size]."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 * math.pi * cycles
    y, x = np.meshgrid(coords, coords, indexing="ij")
    py, px = phase
    if kind == "horizontal":
        return np.sin(y + py)
    if kind == "vertical":
        return np.sin(x + px)
    if kind == "plaid":
        return 0.5 * (np.sin(y + py) + np.sin(x + px))
    if kind == "diamond":  # = 2 sin(.)cos(.): both diagonals, so a mirror maps it onto itself
        return np.sin(x + px) * np.cos(y + py)
    raise ValueError(kind)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array with zero padding (mass near edges fades, as in ClickMe)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(image, radius)
    rows = np.stack([np.convolve(row, taps, mode="valid") for row in padded], axis=0)
    return np.stack([np.convolve(col, taps, mode="valid") for col in rows.T], axis=1)


def render_image(label: int, context_class: int, rng: np.random.Generator, world: dict, spec: dict,
                 part_class: int | None = None):  # fmt: skip
    """Returns (image float32 [S, S, 3] in [0, 1], human map float32 [S, S] max-normalised).

    ``label`` decides the body (animate or not), ``part_class`` the glyph on the part (the
    label's own by default) and ``context_class`` the background texture."""
    size = spec["image_size"]
    glyph = world["glyphs"][label if part_class is None else part_class]
    animate = bool(world["animate"][label])
    context = world["contexts"][context_class]

    # Background: class-correlated context texture over a tinted, random-luminance base.
    luminance = rng.uniform(0.35, 0.65)
    tint = float(spec["context_tint"])
    base = luminance * (1.0 - tint + tint * context["tint"])
    texture = _texture(context["kind"], context["cycles"], size, tuple(rng.uniform(0, 2 * math.pi, 2)))
    contrast = spec["context_contrast"] * rng.uniform(0.8, 1.2)
    image = base[None, None, :] + contrast * texture[:, :, None]

    # Body: position, size and colour carry no class information (only animate vs inanimate shape).
    coords = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    half_w = rng.uniform(0.2, 0.3) * size
    half_h = rng.uniform(0.12, 0.18) * size
    cx = rng.uniform(half_w + 1, size - half_w - 1)
    cy = rng.uniform(0.5 * size, size - half_h - 1)
    if animate:
        inside = 1.0 - np.sqrt(((xx - cx) / half_w) ** 2 + ((yy - cy) / half_h) ** 2)
        body_mask = np.clip(inside * min(half_w, half_h), 0.0, 1.0)  # ~1 px soft edge
    else:
        edge = np.minimum(half_w - np.abs(xx - cx), half_h - np.abs(yy - cy))
        body_mask = np.clip(edge, 0.0, 1.0)
    body_colour = rng.uniform(0.15, 0.85, 3).astype(np.float32)
    shading = 1.0 + 0.15 * (cy - yy) / size  # lit from above, so the body is not a flat patch
    image = image * (1 - body_mask[:, :, None]) + (body_colour[None, None, :] * shading[:, :, None]) * body_mask[:, :, None]

    # Diagnostic part ("head") on top of the body: a skin-coloured square with the class glyph inked in.
    cells = glyph.shape[0]
    cell = max(1, round(_PART_FRACTION * size / cells))
    part = cells * cell
    left = int(np.clip(round(cx + rng.uniform(-0.5, 0.5) * half_w - part / 2), 1, size - part - 1))
    top = int(np.clip(round(cy - half_h - 0.6 * part), 1, size - part - 1))
    # Light skin, dark ink: one polarity, so a glyph is one pattern to learn, not two.
    # The skin mixes a body-derived colour with the part class's own colour (part_tint).
    part_colour = world["contexts"][label if part_class is None else part_class]["tint"]
    own = float(spec["part_tint"])
    skin = np.clip(0.55 + 0.45 * ((1.0 - own) * body_colour + own * part_colour) + rng.normal(0.0, 0.03, 3), 0.0, 1.0)
    ink = np.clip(0.1 + rng.normal(0.0, 0.04, 3), 0.0, 1.0)
    glyph_pixels = np.kron(glyph, np.ones((cell, cell), dtype=bool))
    patch = np.where(glyph_pixels[:, :, None], ink[None, None, :], skin[None, None, :])
    image[top : top + part, left : left + part] = patch

    image = image + rng.normal(0.0, spec["noise_std"], image.shape)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)

    # Human map: the part, blurred as ClickMe maps are, max-normalised to [0, 1].
    part_mask = np.zeros((size, size), dtype=np.float64)
    part_mask[top : top + part, left : left + part] = 1.0
    human_map = _gaussian_blur(part_mask, spec["map_blur_sigma"])
    human_map = (human_map / human_map.max()).astype(np.float32)
    return image, human_map


# ---------------------------------------------------------------------------
# Splits and files
# ---------------------------------------------------------------------------


def _check_spec(spec: dict) -> dict:
    unknown = sorted(set(spec) - set(SPEC_DEFAULTS))
    if unknown:
        raise PipelineError(f"data.synthetic: unknown key(s) {', '.join(unknown)} (expected {', '.join(SPEC_DEFAULTS)})")
    spec = {**SPEC_DEFAULTS, **spec}
    if int(spec["n_classes"]) < 2:
        raise PipelineError(f"data.synthetic.n_classes must be >= 2, got {spec['n_classes']}")
    if int(spec["image_size"]) < 32:
        raise PipelineError(f"data.synthetic.image_size must be >= 32, got {spec['image_size']}")
    for key in ("train_per_class", "heldout_per_class", "stimuli_per_class", "conflict_per_class"):
        if int(spec[key]) < 1:
            raise PipelineError(f"data.synthetic.{key} must be >= 1, got {spec[key]}")
    for key in ("part_agreement", "part_tint", "context_agreement", "context_tint", "map_fraction"):
        if not 0.0 <= float(spec[key]) <= 1.0:
            raise PipelineError(f"data.synthetic.{key} must be in [0, 1], got {spec[key]}")
    for key in ("map_blur_sigma",):
        if float(spec[key]) <= 0:
            raise PipelineError(f"data.synthetic.{key} must be > 0, got {spec[key]}")
    for key in ("context_contrast", "noise_std"):
        if float(spec[key]) < 0:
            raise PipelineError(f"data.synthetic.{key} must be >= 0, got {spec[key]}")
    return spec


def _world(n_classes: int) -> dict:
    classes = class_table(n_classes)
    return {
        "classes": classes,
        "animate": classes["animate"].to_numpy(),
        "glyphs": class_glyphs(n_classes),
        "contexts": class_contexts(n_classes),
    }


def _other_class(rng: np.random.Generator, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """A class other than ``classes``, uniformly at random."""
    return ((classes + rng.integers(1, n_classes, len(classes))) % n_classes).astype(np.int64)


def _cue_classes(split: str, spec: dict, seed: int, split_code: int, n_classes: int, per_class: int):
    """(label, body class, part class, context class) per image of ``split``, and the split's
    generator (it goes on to draw the map flags).

    Ordinary splits: the body always shows the label; the context shows it on
    ``context_agreement`` of the images and the part on ``part_agreement``, each otherwise
    another class. The part draws from its own generator, so the labels and contexts (and so,
    with ``part_agreement`` 1, ``part_tint`` 0 and ``context_tint`` 0.4, the first demo world's
    files) do not depend on it. ``conflict``: the part shows the label and the context another
    class on every image, and the body follows one of the two at random, so that it favours
    neither cue."""
    n = n_classes * per_class
    split_rng = np.random.default_rng([seed, split_code, 0])
    labels = split_rng.permutation(np.repeat(np.arange(n_classes, dtype=np.int64), per_class))
    if split == CONFLICT_SPLIT:
        context = _other_class(split_rng, labels, n_classes)
        body = np.where(split_rng.random(n) < 0.5, labels, context).astype(np.int64)
        return labels, body, labels.copy(), context, split_rng
    context_agrees = split_rng.random(n) < spec["context_agreement"]
    context = np.where(context_agrees, labels, _other_class(split_rng, labels, n_classes))
    part_rng = np.random.default_rng([seed, split_code, 2])
    part_agrees = part_rng.random(n) < spec["part_agreement"]
    part = np.where(part_agrees, labels, _other_class(part_rng, labels, n_classes))
    return labels, labels.copy(), part.astype(np.int64), context.astype(np.int64), split_rng


def generate_split(split: str, spec: dict, seed: int, world: dict | None = None, progress=None) -> dict:
    """Arrays of one split (SPLIT_ARRAYS) plus ``part`` and ``context``: the class each image's
    part glyph and background texture were drawn from. ``split`` is one of SPLITS or
    ``conflict`` (the cue-conflict test set, CONFLICT_ARRAYS)."""
    spec = _check_spec(spec)
    n_classes, size = int(spec["n_classes"]), int(spec["image_size"])
    world = world or _world(n_classes)
    per_class = int(spec[f"{split}_per_class"])
    n = n_classes * per_class
    split_code = (*SPLITS, CONFLICT_SPLIT).index(split)
    labels, body, part, context, split_rng = _cue_classes(split, spec, seed, split_code, n_classes, per_class)
    has_map = np.ones(n, dtype=bool)
    if split == "train":
        n_maps = int(round(spec["map_fraction"] * n))
        has_map = np.zeros(n, dtype=bool)
        has_map[split_rng.permutation(n)[:n_maps]] = True

    images = np.empty((n, size, size, 3), dtype=np.uint8)
    maps = np.zeros((n, size, size), dtype=np.float32)
    for i in range(n):
        # One generator per image: an image never depends on how many came before it.
        image_rng = np.random.default_rng([seed, split_code, 1, i])
        image, human_map = render_image(int(body[i]), int(context[i]), image_rng, world, spec, part_class=int(part[i]))
        images[i] = np.round(image * 255.0).astype(np.uint8)
        if has_map[i]:
            maps[i] = human_map
        if progress is not None:
            progress.update(1)
    ids = np.array([f"{_SPLIT_PREFIX[split]}_{i:05d}" for i in range(n)])
    return {"images": images, "labels": labels, "maps": maps, "has_map": has_map, "ids": ids, "part": part,
            "context": context}  # fmt: skip


def save_npz_reproducibly(path, arrays: dict) -> None:
    """Compressed NPZ with fixed zip timestamps, so equal arrays give byte-identical files
    (np.savez stamps each member with the current time). Written atomically."""
    with atomic_path(path, suffix=".npz") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, array in arrays.items():
                buffer = _bytes_io.BytesIO()
                np.lib.format.write_array(buffer, np.asanyarray(array), allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                archive.writestr(info, buffer.getvalue())


def write_synthetic_dataset(spec: dict, seed: int, outputs: dict) -> None:
    """Write train / heldout / stimuli NPZs, classes.csv and the stimulus manifest (see advalign.columns)."""
    missing = [key for key in _OUTPUT_KEYS if key not in outputs]
    if missing:
        raise PipelineError(f"write_synthetic_dataset: missing output path(s) {', '.join(missing)}")
    spec = _check_spec(dict(spec))
    world = _world(int(spec["n_classes"]))
    classes = world["classes"]
    splits = (*SPLITS, CONFLICT_SPLIT)
    total = sum(int(spec[f"{split}_per_class"]) for split in splits) * int(spec["n_classes"])
    with tqdm(total=total, desc="synthetic images", unit="img", mininterval=1.0) as progress:
        for split in splits:
            arrays = generate_split(split, spec, seed, world=world, progress=progress)
            names = CONFLICT_ARRAYS if split == CONFLICT_SPLIT else SPLIT_ARRAYS
            check_stimulus_arrays(arrays, f"{outputs[split]} (not written)", names)  # finite maps, shapes
            save_npz_reproducibly(outputs[split], {name: arrays[name] for name in names})
            if split == "stimuli":
                names = classes["class_name"].to_numpy()
                manifest = pd.DataFrame(
                    {
                        "image_id": arrays["ids"],
                        "class_index": arrays["labels"],
                        "wordnet_id": "",  # synthetic classes have no WordNet synset
                        "class_name": names[arrays["labels"]],
                        "animate": classes["animate"].to_numpy()[arrays["labels"]],
                        # Where the image comes from; for synthetic stimuli, also which class its context shows.
                        "source": [f"synthetic;context={names[c]}" for c in arrays["context"]],
                    },
                    columns=list(MANIFEST_COLUMNS),
                )
    write_table(classes, Path(outputs["classes"]))
    write_table(manifest, Path(outputs["manifest"]))
