"""The stimulus NPZ files (``results/data/stimuli.npz``, ``conflict.npz``): one reader and one
check for every stage, and the planning check that keeps non-finite stimuli out of every job.

Images are ``uint8 [N, H, W, 3]``; maps are numbers ``[N, H, W]`` and must be finite. A map
holding NaN or infinity would be treated differently by each stage (an attack stops on it, a
``>= 0.5`` threshold silently counts it as unmarked), so it is refused where the file is
written, while planning (:func:`check_stimulus_file_cached`) and whenever a stage reads it.

No torch here: planning and the torch-free stages import it.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np

from .columns import SPLIT_ARRAYS
from .io import PipelineError, require_file


def check_stimulus_arrays(data: dict, where, names=SPLIT_ARRAYS) -> None:
    """Shapes, types and finite values of a stimulus set's arrays; one line naming ``where``."""
    missing = [k for k in names if k not in data]
    if missing:
        raise PipelineError(f"{where}: missing array(s) {', '.join(missing)} (expected {', '.join(names)})")
    images, labels, maps, has_map, ids = (np.asarray(data[k]) for k in SPLIT_ARRAYS)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise PipelineError(f"{where}: images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    n = len(images)
    if n == 0:
        raise PipelineError(f"{where}: no stimuli")
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise PipelineError(f"{where}: labels must be non-negative integers [N={n}], got {labels.dtype} {labels.shape}")
    if maps.shape != images.shape[:3]:
        raise PipelineError(f"{where}: maps must be [N, H, W] = {images.shape[:3]}, got {maps.shape}")
    if has_map.shape != (n,) or ids.shape != (n,):
        raise PipelineError(f"{where}: has_map and ids must have one entry per image ({n})")
    if len(set(ids.tolist())) != n:
        raise PipelineError(f"{where}: image ids are not unique")
    if not (np.issubdtype(maps.dtype, np.floating) or np.issubdtype(maps.dtype, np.integer)):
        raise PipelineError(f"{where}: maps must be numeric, got {maps.dtype}")
    bad = ~np.isfinite(maps.reshape(n, -1)).all(axis=1)
    if bad.any():
        named = ", ".join(str(i) for i in ids[bad][:5]) + (" ..." if bad.sum() > 5 else "")
        raise PipelineError(
            f"{where}: human maps of {int(bad.sum())} image(s) hold NaN or infinite values ({named}); "
            "remake the file (delete it and rerun) or fix its maps"
        )
    for extra in names[len(SPLIT_ARRAYS):]:
        if np.asarray(data[extra]).shape != (n,):
            raise PipelineError(f"{where}: {extra} must have one entry per image ({n})")


def load_stimulus_file(path, names=SPLIT_ARRAYS, what: str = "stimulus file") -> dict:
    """A checked stimulus NPZ (``names``: SPLIT_ARRAYS, or CONFLICT_ARRAYS for the conflict set)
    with labels as int64, has_map as bool and ids as str."""
    path = require_file(path, what)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in names if k not in npz.files]
            if missing:
                raise PipelineError(f"{path}: missing array(s) {', '.join(missing)} (expected {', '.join(names)})")
            data = {k: npz[k] for k in names}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.zlib.error) as exc:
        raise PipelineError(f"{path}: not a readable NPZ file ({str(exc).splitlines()[0][:120]})") from None
    check_stimulus_arrays(data, path, names)
    data["labels"] = data["labels"].astype(np.int64)
    data["has_map"] = data["has_map"].astype(bool)
    data["ids"] = data["ids"].astype(str)
    return data


def check_stimulus_file_cached(path, cache_dir, names=SPLIT_ARRAYS) -> None:
    """While planning: if the stimulus file exists, check it (as :func:`load_stimulus_file`),
    remembering a file that passed by its path, size and modification time so that an
    unchanged file is read once. An absent file is not an error (a job will make it)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{','.join(names)}".encode()).hexdigest()
    stamp = Path(cache_dir) / f"stimuli-ok-{key[:24]}"
    if stamp.is_file():
        return
    load_stimulus_file(path, names)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(f"{path}\n")
