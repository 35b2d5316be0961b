"""The sha256 lock of the ClickMe shards: what every stage that reads fetched shards checks.

``{shard_dir}/{split}.lock.json`` (written by advalign.data.fetch the first time a shard is used)
records each shard's sha256, bytes and record count; ``results/data/clickme_{split}.json`` (the
fetch rule's manifest) lists the shards a run uses. :func:`verified_shards` checks every listed
shard against its lock on every later use. Kept apart from the download code so that the jobs
that read shards (stimuli, training) carry only this module in their code fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..io import PipelineError

LOCK_FORMAT = 1
_CHUNK = 1 << 20


def lock_path(shard_dir, split: str) -> Path:
    return Path(shard_dir) / f"{split}.lock.json"


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def read_lock(shard_dir, split: str) -> dict:
    path = lock_path(shard_dir, split)
    if not path.is_file():
        return {"format": LOCK_FORMAT, "split": split, "shards": {}}
    try:
        lock = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: unreadable lock file ({exc}); delete it to verify the shards afresh") from None
    if not isinstance(lock, dict) or lock.get("format") != LOCK_FORMAT or not isinstance(lock.get("shards"), dict):
        raise PipelineError(f"{path}: not a ClickMe lock file of format {LOCK_FORMAT}; delete it to verify afresh")
    return lock


def verified_shards(manifest) -> list[Path]:
    """The shard paths of a fetch manifest, each checked against the sha256 in its lock file
    (every use after the first): a shard changed or damaged since is one line naming it."""
    manifest = Path(manifest)
    try:
        data = json.loads(manifest.read_text())
        entries = data["shards"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PipelineError(f"{manifest}: not a ClickMe fetch manifest ({exc})") from None
    paths = []
    locks: dict[Path, dict] = {}
    for entry in entries:
        path = Path(entry["path"])
        if not path.is_file():
            raise PipelineError(f"{path}: ClickMe shard listed in {manifest} is missing (rerun its fetch)")
        lock_file = lock_path(path.parent, data["split"])
        if lock_file not in locks:
            locks[lock_file] = read_lock(path.parent, data["split"])
        recorded = locks[lock_file]["shards"].get(path.name, {}).get("sha256")
        if recorded is None:
            raise PipelineError(f"{path}: not in the lock file {lock_file}; rerun its fetch to verify and record it")
        actual = file_sha256(path)
        if actual != recorded or actual != entry["sha256"]:
            raise PipelineError(
                f"{path}: sha256 {actual[:16]}... differs from {recorded[:16]}... recorded in {lock_file}; "
                "the file changed since it was fetched (delete it and rerun to fetch it again)"
            )
        paths.append(path)
    return paths


