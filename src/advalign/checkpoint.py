"""Resumable training: what a checkpoint holds, and when one may be used.

``results/models/{model}/checkpoint.pt`` (beside the job's outputs; removed when the job
succeeds) is written atomically (advalign.io.torch_save) by rank 0 and holds

* ``spec_hash`` -- :func:`spec_hash` of the job: model row, recipe, seed, device type, world
  size and the identity (path, size, mtime) of every input file. A checkpoint whose hash
  differs was written for another job (changed lambda, recipe, data, base weights or
  number of processes) and is ignored, with a line in the log, and the run starts afresh;
* ``step`` (optimizer steps done), ``epoch`` and ``batch`` (batches of that epoch done):
  the sampler resumes at that batch of that epoch's fixed order;
* ``model``, ``optimizer`` and ``scheduler`` state dicts;
* ``history`` (finished epochs) and ``epoch_sums`` (the running sums of the epoch in
  progress, already summed over ranks);
* ``rng``: for every rank, the torch CPU, CUDA, NumPy and Python generator states;
* ``elapsed_seconds`` and ``cpu_seconds`` spent before the checkpoint.

Everything is a plain type or a tensor, so the file loads with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch

from .io import PipelineError, torch_load, torch_save

FORMAT = 1
log = logging.getLogger(__name__)


def file_identity(path) -> list:
    """What identifies an input file cheaply: path, size and modification time."""
    if not path:
        return []
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return [str(path)]
    return [str(path), stat.st_size, stat.st_mtime_ns]


def spec_hash(spec: dict) -> str:
    """SHA-256 of the canonical JSON of ``spec``."""
    text = json.dumps({"format": FORMAT, **spec}, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def rng_state(device: torch.device) -> dict:
    """This process's generator states as plain types and tensors."""
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *map(_plain, numpy_state[2:])],
        "python": _listify(random.getstate()),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_tuplify(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _listify(value):
    return [_listify(v) for v in value] if isinstance(value, tuple) else value


def _tuplify(value):
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


def save(path, state: dict) -> None:
    torch_save({"format": FORMAT, **state}, path)


def load(path, expected_hash: str) -> dict | None:
    """The checkpoint at ``path`` if it belongs to this job, else None (and why, in the log)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch_load(path, "training checkpoint")
    except PipelineError as exc:  # truncated or foreign file: never trusted
        log.warning("%s; ignored, training from the start", exc)
        return None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        log.warning("%s: checkpoint of another format ignored; training from the start", path)
        return None
    if state.get("spec_hash") != expected_hash:
        log.warning("%s: checkpoint of a different job spec rejected (hash differs); training from the start", path)
        return None
    return state


def remove_stale_temporaries(path) -> None:
    """Temporary files a killed writer left next to ``path`` (advalign.io.atomic_path names)."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp*"):
        stale.unlink(missing_ok=True)
