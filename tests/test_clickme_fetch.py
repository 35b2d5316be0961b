"""Fetching the public ClickMe shards (advalign.data.fetch) from a real HTTP server on 127.0.0.1
that serves ClickMe-format shards the way the authors' bucket lays them out:
``{split}/{split}-{i}.tfrecords``. Which shards exist is discovered; a killed fetch resumes with a
Range request; corrupt, missing and unreachable shards are one line; the sha256 lock is checked on
every later use; shards placed by hand are verified the same way, with no network."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from paper_fixtures import write_clickme_shards
from shard_server import serving

from advalign.data.fetch import fetch_split
from advalign.data.shard_lock import file_sha256, lock_path, verified_shards
from advalign.io import PipelineError

FETCH = {"base_url": None, "val": "auto", "train": "auto", "retries": 2, "backoff_s": 0.01, "timeout_s": 10}


@pytest.fixture
def bucket(tmp_path) -> Path:
    """The server's folder: val-0..2 (no val-3: the end is found, not assumed) and train-0."""
    root = tmp_path / "bucket"
    write_clickme_shards(root / "val", "val", [[1, 2, 3], [4, 5], [6, 7, 8, 9]], size=64)
    write_clickme_shards(root / "train", "train", [[1, 2]])
    return root


def _fetch(server, split="val", **changes) -> dict:
    return {**FETCH, "base_url": server.url, **changes}


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def test_auto_finds_which_shards_exist_and_a_later_run_needs_no_network(bucket, tmp_path):
    shard_dir, out = tmp_path / "clickme", tmp_path / "results" / "clickme_val.json"
    with serving(bucket) as server:
        fetch = _fetch(server)
        manifest = fetch_split("val", shard_dir, fetch, [], out)
        asked = [path for path, _, _ in server.requests]
    assert [Path(s["path"]).name for s in manifest["shards"]] == ["val-0.tfrecords", "val-1.tfrecords",
                                                                   "val-2.tfrecords"]  # fmt: skip
    assert asked[-1].endswith("/val/val-3.tfrecords")  # the 404 that ended the split
    assert [s["records"] for s in manifest["shards"]] == [3, 2, 4]
    for entry in manifest["shards"]:
        assert entry["sha256"] == file_sha256(bucket / "val" / Path(entry["path"]).name)
    lock = json.loads(lock_path(shard_dir, "val").read_text())
    assert lock["names"] == ["val-0.tfrecords", "val-1.tfrecords", "val-2.tfrecords"]
    assert not list(shard_dir.glob("*.part"))
    assert verified_shards(out) == [shard_dir / f"val-{i}.tfrecords" for i in range(3)]
    # The server is gone: the lock knows which shards exist, and they are verified from disk.
    again = fetch_split("val", shard_dir, fetch, [], out)
    assert again["shards"] == manifest["shards"]


def test_shards_placed_by_hand_are_verified_and_locked_the_same_way(bucket, tmp_path):
    shard_dir = tmp_path / "clickme"
    shutil.copytree(bucket / "val", shard_dir)
    manifest = fetch_split("val", shard_dir, FETCH, ["val-*.tfrecords"], tmp_path / "m.json")
    assert len(manifest["shards"]) == 3 and manifest["source"].startswith("placed by hand")
    assert set(json.loads(lock_path(shard_dir, "val").read_text())["shards"]) == {f"val-{i}.tfrecords" for i in range(3)}
    # A shard changed after it was locked: refused by the next use, and by the next fetch.
    shard = shard_dir / "val-1.tfrecords"
    shutil.copy(shard_dir / "val-2.tfrecords", shard)
    with pytest.raises(PipelineError) as excinfo:
        verified_shards(tmp_path / "m.json")
    assert _one_line(excinfo).startswith(f"{shard}: sha256 ") and "val.lock.json" in str(excinfo.value)
    with pytest.raises(PipelineError, match=r"val-1\.tfrecords: sha256 .* differs from .* recorded in"):
        fetch_split("val", shard_dir, FETCH, ["val-*.tfrecords"], tmp_path / "m.json")


def test_a_corrupt_shard_is_refused_in_one_line_and_nothing_is_left(bucket, tmp_path):
    shard = bucket / "val" / "val-1.tfrecords"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit inside a record
    shard.write_bytes(bytes(data))
    shard_dir = tmp_path / "clickme"
    with serving(bucket) as server, pytest.raises(PipelineError) as excinfo:
        fetch_split("val", shard_dir, _fetch(server), [], tmp_path / "m.json")
    message = _one_line(excinfo)
    assert message.startswith(f"{server.url}val/val-1.tfrecords: ") and "checksum mismatch" in message, message
    assert message.endswith(f"(config data.paper.clickme.fetch.base_url = {server.url})"), message
    assert (shard_dir / "val-0.tfrecords").is_file()  # verified before the bad one: kept and locked
    assert not (shard_dir / "val-1.tfrecords").exists() and not list(shard_dir.glob("*.part"))
    assert not (tmp_path / "m.json").exists()


def test_a_missing_shard_of_an_explicit_range_names_the_url_and_the_key(bucket, tmp_path):
    with serving(bucket) as server, pytest.raises(PipelineError) as excinfo:
        fetch_split("val", tmp_path / "clickme", _fetch(server, val=[0, 3]), [], tmp_path / "m.json")
    assert _one_line(excinfo) == (f"{server.url}val/val-3.tfrecords: HTTP 404 Not Found "
                                  "(config data.paper.clickme.fetch.val = [0, 3])")  # fmt: skip


def test_a_refused_connection_is_retried_then_one_line(tmp_path, caplog):
    with pytest.raises(PipelineError) as excinfo:
        fetch_split("val", tmp_path / "clickme", {**FETCH, "base_url": "http://127.0.0.1:9/click-me/"}, [],
                    tmp_path / "m.json")  # fmt: skip
    message = _one_line(excinfo)
    assert message.startswith("http://127.0.0.1:9/click-me/val/val-0.tfrecords: connection refused after 3 attempt(s)")
    assert "(config data.paper.clickme.fetch.base_url = http://127.0.0.1:9/click-me/; null uses the shards" in message
    assert caplog.text.count("transient error, retry") == 2


def test_transient_server_errors_are_retried(bucket, tmp_path):
    with serving(bucket) as server:
        server.fail_first = 2
        manifest = fetch_split("train", tmp_path / "clickme", _fetch(server), [], tmp_path / "m.json")
        statuses = [status for _, _, status in server.requests]
    assert statuses[:3] == [503, 503, 200] and len(manifest["shards"]) == 1


_CHILD = """
import json, sys
from advalign.data.fetch import fetch_split
from advalign.stage import configure_logging
configure_logging()
fetch_split("val", sys.argv[1], json.loads(sys.argv[2]), [], sys.argv[3])
"""


def test_a_killed_fetch_resumes_where_it_stopped(bucket, tmp_path):
    write_clickme_shards(bucket / "val", "val", [list(range(40))], size=160)  # a bigger val-0
    shard_dir, out = tmp_path / "clickme", tmp_path / "m.json"
    part = shard_dir / "val-0.tfrecords.part"
    with serving(bucket) as server:
        server.throttle_s = 0.05
        args = [sys.executable, "-c", _CHILD, str(shard_dir), json.dumps(_fetch(server)), str(out)]
        child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not (part.exists() and part.stat().st_size > 64 * 1024) and time.time() < deadline:
            assert child.poll() is None, child.stderr.read()
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait()
        had = part.stat().st_size
        assert 0 < had < (bucket / "val" / "val-0.tfrecords").stat().st_size
        assert not (shard_dir / "val-0.tfrecords").exists() and not out.exists()  # nothing looks complete
        server.throttle_s = 0.0
        manifest = fetch_split("val", shard_dir, _fetch(server), [], out)
        ranges = [rng for path, rng, _ in server.requests if path.endswith("/val/val-0.tfrecords")]
    assert ranges[-1] == f"bytes={had}-"  # resumed, not restarted
    assert file_sha256(shard_dir / "val-0.tfrecords") == file_sha256(bucket / "val" / "val-0.tfrecords")
    assert manifest["shards"][0]["records"] == 40 and not part.exists()
