"""The resumable chunk store of one attack job (like auto-attack's ``EvaluationState``).

``results/attacks/{attack}/{model}.chunks/`` holds ``job.json`` (the job's hash and a
summary) and one ``chunk_NNNNN.npz`` per finished chunk of stimuli. A chunk is reused
only when it carries the same job hash and the same stimulus range, so a restarted job
ends with the same bytes as an uninterrupted one; chunks of another job are removed.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from ..io import save_npz, write_json

log = logging.getLogger(__name__)

# Bump when the chunk file layout or the meaning of a stored number changes.
CHUNK_FORMAT = 1


def chunk_dir_for(out_table) -> Path:
    """``results/attacks/{attack}/{model}.chunks/``, next to the job's table."""
    out_table = Path(out_table)
    return out_table.with_name(out_table.name.removesuffix(".parquet") + ".chunks")


class ChunkStore:
    """Finished chunks of one job, identified by ``digest`` (``job.job_hash``)."""

    def __init__(self, directory, digest: str):
        self.directory = Path(directory)
        self.digest = digest

    @classmethod
    def for_table(cls, out_table, digest: str) -> "ChunkStore":
        return cls(chunk_dir_for(out_table), digest)

    def open(self, summary: dict) -> None:
        """Keep the directory if it belongs to this job; otherwise start it afresh."""
        stamp = self.directory / "job.json"
        if self.directory.is_dir():
            try:
                stored = json.loads(stamp.read_text()).get("hash")
            except (OSError, ValueError):
                stored = None
            if stored == self.digest:
                return
            log.info("%s: chunks from a different job (or unreadable); starting over", self.directory)
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        write_json({"hash": self.digest, **summary}, stamp)

    def path(self, number: int) -> Path:
        return self.directory / f"chunk_{number:05d}.npz"

    def load(self, number: int, start: int, stop: int, expected=()) -> dict | None:
        """A finished chunk's arrays, or None if absent. A chunk that cannot be used -- unreadable
        (truncated, a bad CRC, a corrupt compressed stream), from another job or stimulus range,
        or lacking one of the ``expected`` arrays -- is logged with its path and why, removed,
        and None is returned, so the job recomputes it: a damaged chunk never stops a job."""
        path = self.path(number)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                chunk = {k: npz[k] for k in npz.files}
            problem = None
            missing = [k for k in ("job_hash", "start", "stop", *expected) if k not in chunk]
            if missing:
                problem = f"lacks array(s) {', '.join(missing)}"
            elif str(chunk["job_hash"]) != self.digest:
                problem = "written by a different job"
            elif (int(chunk["start"]), int(chunk["stop"])) != (start, stop):
                problem = f"covers stimuli {int(chunk['start'])}-{int(chunk['stop'])}, not {start}-{stop}"
        except Exception as exc:  # any damage: zipfile, zlib, numpy header or EOF errors
            kind = type(exc).__name__ if type(exc).__module__ == "builtins" else f"{type(exc).__module__}.{type(exc).__name__}"
            problem = f"unreadable ({kind}: {(str(exc).splitlines() or [''])[0][:100]})"
        if problem is None:
            return chunk
        log.warning("%s: chunk %s; removed, recomputing it", path, problem)
        path.unlink(missing_ok=True)
        return None

    def save(self, number: int, start: int, stop: int, chunk: dict) -> None:
        save_npz(self.path(number), job_hash=np.array(self.digest), start=np.array(start), stop=np.array(stop),
                 **chunk)  # fmt: skip

    def remove(self) -> None:
        """Once the job's outputs are written, its chunks are no longer needed."""
        shutil.rmtree(self.directory, ignore_errors=True)
