"""Fetching the public ClickMe shards: resumable, retried, atomic and verified downloads.

The authors publish ClickMe (as released for harmonization) as TFRecord shards under one base
URL (``data.paper.clickme.fetch.base_url``), as ``{split}/{split}-{i}.tfrecords``. No checksums
are published, and which shards exist is found out here, not assumed: with ``shards: auto`` a
split's shards are fetched from index 0 until the server answers 404 for the next one.

Each shard

* streams into ``{shard}.part`` beside its final name, with a byte progress bar;
* resumes a ``.part`` left by a killed fetch with an HTTP Range request (a server that answers
  the whole file instead restarts it from zero);
* is retried with exponential backoff on transient errors (refused or reset connections,
  timeouts, HTTP 5xx) up to ``retries`` times;
* has every record's CRC checked (advalign.data.tfrecord) before it is renamed, atomically,
  to its final name: a file with the final name is always complete.

The first time a shard is used its sha256 is recorded in the split's lock file beside the
data, ``{shard_dir}/{split}.lock.json``; every later use checks it (advalign.data.shard_lock.verified_shards).
Shards placed by hand are verified and locked the same way: with ``base_url: null`` the shards
on disk that match the split's glob patterns are used as they are, with no network at all.

The fetch rule writes ``results/data/clickme_{split}.json`` (the manifest: the shards, their
sha256, bytes and record counts); the stages that read ClickMe take the manifest as input.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..io import PipelineError, write_json
from .shard_lock import file_sha256, lock_path, read_lock
from .tfrecord import iter_records

log = logging.getLogger(__name__)

SPLITS = ("val", "train")
MAX_AUTO_SHARDS = 100_000  # a server that never answers 404 is an error, not an endless fetch
_CHUNK = 1 << 20
_FETCH_KEY = "data.paper.clickme.fetch"


class ShardNotFound(PipelineError):
    """The server has no such shard (HTTP 404)."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index}.tfrecords"


def shard_url(base_url: str, split: str, index: int) -> str:
    return f"{base_url.rstrip('/')}/{split}/{shard_name(split, index)}"


# --------------------------------------------------------------------------- download


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        text = getattr(reason, "strerror", None) or str(reason)
        return text.lower() if isinstance(reason, OSError) else str(text)
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def download(url: str, dest, *, retries: int = 4, backoff_s: float = 2.0, timeout_s: float = 60.0,
             key: str = _FETCH_KEY, server_key: str = f"{_FETCH_KEY}.base_url") -> Path:  # fmt: skip
    """Download ``url`` to ``dest`` through ``dest.part`` (resumed if present); returns ``dest``.

    The ``.part`` file is left in place when the download fails or is killed, so the next call
    resumes it; ``dest`` itself only ever appears complete (the caller renames after verifying).
    Errors are one line naming the URL and the config key: ``key`` (what asked for this file)
    for a 404, ``server_key`` (where the server is set) when it cannot be reached.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    attempt = 0
    while True:
        try:
            _download_once(url, part, timeout_s)
            return part
        except urllib.error.HTTPError as exc:
            exc.close()  # the error response's connection
            if exc.code == 404:
                raise ShardNotFound(f"{url}: HTTP 404 Not Found (config {key})") from None
            transient = exc.code >= 500 or exc.code in (408, 429)  # server trouble or throttling
            if not transient or attempt >= retries:
                raise PipelineError(
                    f"{url}: {_reason(exc)} after {attempt + 1} attempt(s) (config {server_key})"
                ) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            if attempt >= retries:
                raise PipelineError(
                    f"{url}: {_reason(exc)} after {attempt + 1} attempt(s) (config {server_key}; "
                    "null uses the shards placed in shard_dir by hand, with no network)"
                ) from None
        wait = backoff_s * 2**attempt
        attempt += 1
        log.warning("%s: transient error, retry %d of %d in %.1f s", url, attempt, retries, wait)
        time.sleep(wait)


def _download_once(url: str, part: Path, timeout_s: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "advalign-fetch/1"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the .part already holds the whole file
            exc.close()
            log.info("%s: %d bytes already downloaded", url, have)
            return
        raise
    with response:
        if have and response.status == 206:
            mode, start = "ab", have
            log.info("%s: resuming at byte %d", url, have)
        else:
            if have:
                log.info("%s: the server sent the whole file; restarting the download", url)
            mode, start = "wb", 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        with open(part, mode) as fh, tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                                          desc=part.name.removesuffix(".part"), mininterval=1.0) as bar:  # fmt: skip
            while True:
                block = response.read1(_CHUNK)  # what has arrived: a kill loses at most one block
                if not block:
                    break
                fh.write(block)
                bar.update(len(block))
        if total is not None and part.stat().st_size != total:
            raise ConnectionError(f"connection closed at byte {part.stat().st_size} of {total}")


# --------------------------------------------------------------------------- verification


def check_shard(path, where: str | None = None) -> dict:
    """Every record's CRC checked and the file's sha256: ``{"sha256", "bytes", "records"}``.
    A corrupt or truncated shard is one line naming the file (or ``where``, e.g. its URL)."""
    path = Path(path)
    records = 0
    try:
        for _ in iter_records(path, verify_crc=True):
            records += 1
    except PipelineError as exc:
        text = str(exc)
        raise PipelineError(f"{where}: {text}" if where else text) from None
    if records == 0:
        raise PipelineError(f"{where or path}: no records (an empty file is not a ClickMe shard)")
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size, "records": records}


def _check_against_lock(path: Path, info: dict, lock: dict, lock_file: Path) -> None:
    recorded = lock["shards"].get(path.name)
    if recorded is not None and recorded["sha256"] != info["sha256"]:
        raise PipelineError(
            f"{path}: sha256 {info['sha256'][:16]}... differs from {recorded['sha256'][:16]}... recorded in "
            f"{lock_file} when it was first fetched; the file changed (delete it to fetch it again)"
        )


# --------------------------------------------------------------------------- one split


def _indices(spec):
    """The shard indices to fetch: ``auto`` (0, 1, ... until a 404) or an inclusive [first, last]."""
    if spec == "auto":
        return range(MAX_AUTO_SHARDS), True
    first, last = spec
    return range(int(first), int(last) + 1), False


def fetch_split(split: str, shard_dir, fetch: dict, patterns, out_manifest) -> dict:
    """Make one split's shards present, complete and verified, and write its manifest.

    ``fetch``: the config block data.paper.clickme.fetch (base_url, val/train ranges, retries,
    backoff_s, timeout_s). ``patterns``: the split's glob patterns, used when base_url is null.
    """
    from .clickme import find_shards

    if split not in SPLITS:
        raise PipelineError(f"ClickMe split {split!r} is not one of {', '.join(SPLITS)}")
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    lock_file = lock_path(shard_dir, split)
    lock = read_lock(shard_dir, split)
    base_url = fetch.get("base_url")
    key = f"{_FETCH_KEY}.{split}"
    shards = []

    def use(path: Path, info: dict) -> None:
        _check_against_lock(path, info, lock, lock_file)
        lock["shards"][path.name] = info
        write_json(lock, lock_file)  # recorded as soon as it is verified: a kill loses nothing
        shards.append({"path": str(path), **info})
        log.info("%s: %d records, %d bytes, sha256 %s", path.name, info["records"], info["bytes"], info["sha256"])

    def checked(path: Path, where: str | None, config_key: str) -> dict:
        try:
            return check_shard(path, where)
        except PipelineError as exc:
            raise PipelineError(f"{exc} (config {config_key})") from None

    placed = f"data.paper.clickme.shard_dir = {shard_dir}"
    if base_url is None:
        for path in find_shards(shard_dir, patterns):
            use(path, checked(path, None, placed))
        source = f"placed by hand in {shard_dir}"
    else:
        indices, auto = _indices(fetch[split])
        if auto and lock.get("discovered") == {"base_url": base_url, "range": "auto"}:
            # The server was asked once which shards exist; the lock remembers its answer.
            indices, auto = [int(name.split("-")[1].split(".")[0]) for name in lock["names"]], False
        found = []
        for index in indices:
            path = shard_dir / shard_name(split, index)
            url = shard_url(base_url, split, index)
            if path.is_file():  # fetched before, or placed by hand: verified the same way
                use(path, checked(path, None, placed))
            else:
                try:
                    part = download(url, path, retries=fetch["retries"], backoff_s=fetch["backoff_s"],
                                    timeout_s=fetch["timeout_s"], key=f"{key} = {fetch[split]}",
                                    server_key=f"{_FETCH_KEY}.base_url = {base_url}")  # fmt: skip
                except ShardNotFound:
                    if auto and found:
                        log.info("%s: not on the server; %s has %d shard(s)", url, split, len(found))
                        break
                    raise
                try:
                    info = checked(part, url, f"{_FETCH_KEY}.base_url = {base_url}")
                except PipelineError:
                    part.unlink(missing_ok=True)  # a corrupt download is never resumed or renamed
                    raise
                part.replace(path)  # atomic: the final name only ever holds a verified shard
                use(path, info)
            found.append(path.name)
        else:
            if auto:
                raise PipelineError(f"{base_url}: more than {MAX_AUTO_SHARDS} {split} shards; give {key} as [first, last]")
        lock.update(discovered={"base_url": base_url, "range": fetch[split]}, names=found)
        source = base_url
    if not shards:
        raise PipelineError(f"{shard_dir}: no {split} shard")
    write_json(lock, lock_file)
    manifest = {"split": split, "source": source, "lock": str(lock_file), "shards": shards}
    write_json(manifest, out_manifest)
    log.info("%s: %d shard(s), %d records, %.1f MB", split, len(shards), sum(s["records"] for s in shards),
             sum(s["bytes"] for s in shards) / 1e6)  # fmt: skip
    return manifest
