"""A job killed mid-way (SIGKILL) and restarted ends with the same bytes as one that never stopped;
chunks of another job are never reused."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from attack_helpers import coloured_squares, load_attacked_model, save_weights

from advalign.attacks import chunk_dir_for, run_attack_job

TESTS = Path(__file__).resolve().parent
N_IMAGES, CHUNK = 24, 6

# The job as its own process, exactly as a Snakemake script would run it.
RUNNER = """
import json, logging, sys
import torch
logging.basicConfig(level=logging.INFO)
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from attack_helpers import load_attacked_model
from advalign.attacks import run_attack_job
job, stimuli, weights, table, examples = json.loads(open(sys.argv[2]).read()), *sys.argv[3:7]
run_attack_job(job, stimuli, weights, table, examples, model_loader=load_attacked_model, progress=False)
"""


def _job(steps: int = 6) -> dict:
    return {
        "attack": "pgd_l2",
        # Random starts on: resuming must also reproduce each image's random draws.
        "spec": {"eps_min": 0.001, "eps_max": 10.0, "threshold": 1e-3, "steps": steps, "random_start": True},
        "model": {"model": "tiny_cnn", "arch_class": "CNN"},
        "batch_size": 4,
        "chunk_size": CHUNK,
        "keep_examples": 12,
        "precision": "fp32",
        "device": "cpu",
        "seed": 3,
    }


# Attacks are timed and compared on one core; the fixture lives in conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    save_weights(root / "weights.pt")
    images, labels, maps = coloured_squares(N_IMAGES, seed=11)
    labels[5] = (labels[5] + 1) % 4  # one misclassified image in the first chunk
    np.savez(
        root / "stimuli.npz",
        images=images,
        labels=labels,
        maps=maps,
        has_map=np.ones(N_IMAGES, dtype=bool),
        ids=np.array([f"stim_{i:05d}" for i in range(N_IMAGES)]),
    )
    return root


def _start(root: Path, job: dict, name: str) -> subprocess.Popen:
    job_file = root / f"{name}.job.json"
    job_file.write_text(json.dumps(job))
    args = [str(TESTS), str(job_file), str(root / "stimuli.npz"), str(root / "weights.pt")]
    args += [str(root / f"{name}.parquet"), str(root / f"{name}.npz")]
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen) -> str:
    """Wait for a job; return its log (stderr)."""
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return err


def _kill_after_first_chunk(root: Path, job: dict, name: str) -> list[str]:
    chunks = chunk_dir_for(root / f"{name}.parquet")
    proc = _start(root, job, name)
    deadline = time.time() + 60
    while not (chunks / "chunk_00000.npz").exists():
        assert proc.poll() is None, "the job ended before its first chunk was saved"
        assert time.time() < deadline, "no chunk appeared"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = sorted(p.name for p in chunks.glob("chunk_*.npz"))
    assert not (root / f"{name}.parquet").exists(), "killed too late: the job had finished"
    assert 1 <= len(done) < N_IMAGES // CHUNK
    return done


def _same_examples(a: Path, b: Path) -> None:
    # NPZ zip members carry timestamps, so compare the arrays rather than the bytes.
    with np.load(a) as left, np.load(b) as right:
        assert sorted(left.files) == sorted(right.files)
        for key in left.files:
            np.testing.assert_array_equal(left[key], right[key], err_msg=key)


def test_killed_job_resumes_to_identical_bytes(inputs):
    job = _job()
    _finish(_start(inputs, job, "uninterrupted"))

    done = _kill_after_first_chunk(inputs, job, "killed")
    log = _finish(_start(inputs, job, "killed"))

    assert f"resumed {len(done)} finished chunk(s)" in log  # read back, not recomputed
    assert (inputs / "killed.parquet").read_bytes() == (inputs / "uninterrupted.parquet").read_bytes()
    _same_examples(inputs / "killed.npz", inputs / "uninterrupted.npz")
    assert not chunk_dir_for(inputs / "killed.parquet").exists()


def test_chunks_of_another_job_are_never_reused(inputs):
    chunks = chunk_dir_for(inputs / "changed.parquet")
    _kill_after_first_chunk(inputs, _job(), "changed")
    with np.load(chunks / "chunk_00000.npz") as first:
        stale_epsilon = first["epsilon"]

    changed = _job(steps=4)  # restarted with another spec
    log = _finish(_start(inputs, changed, "changed"))
    assert "different job" in log and "resumed" not in log
    # The same job run here, in this process, from nothing: the same bytes.
    fresh = inputs / "fresh.parquet"
    run_attack_job(
        changed, inputs / "stimuli.npz", inputs / "weights.pt", fresh, inputs / "fresh.npz",
        model_loader=load_attacked_model, progress=False,
    )  # fmt: skip
    assert (inputs / "changed.parquet").read_bytes() == fresh.read_bytes()
    # ...and reusing the stale chunk would have shown: its numbers differ from the new job's.
    fresh_epsilon = pd.read_parquet(fresh)["epsilon"].to_numpy()[:CHUNK]
    assert not np.allclose(stale_epsilon, fresh_epsilon, equal_nan=True)


def _damaged_copies(chunk: Path) -> dict[str, bytes]:
    """The ways a finished chunk file turns up damaged: cut short, a corrupt deflate stream
    (zlib.error), a bad CRC, the arrays of another layout."""
    import io
    import zipfile

    data = chunk.read_bytes()
    damaged = {"truncated": data[: len(data) // 2]}
    with zipfile.ZipFile(chunk) as archive:
        info = archive.getinfo("epsilon.npy")
    local = data[info.header_offset : info.header_offset + 30]  # the member's local header
    payload = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    stream = bytearray(data)
    stream[payload : payload + 8] = b"\xff" * 8  # an invalid deflate block header
    damaged["corrupt stream"] = bytes(stream)
    crc = bytearray(data)
    crc[payload + info.compress_size - 2] ^= 0x01  # the last bytes: inflates, but the CRC fails
    damaged["bad crc"] = bytes(crc)
    buffer = io.BytesIO()
    with np.load(chunk) as npz:
        np.savez(buffer, **{k: npz[k] for k in npz.files if k != "epsilon"})
    damaged["missing array"] = buffer.getvalue()
    return damaged


def test_a_damaged_chunk_is_logged_removed_and_recomputed(inputs, caplog):
    """Chunk stores heal themselves, loudly: whatever the damage, the job names the file in its
    log, recomputes that chunk and ends with the bytes of an uninterrupted job."""
    job = _job()
    reference = inputs / "reference.parquet"
    if not reference.exists():
        _finish(_start(inputs, job, "reference"))
    done = _kill_after_first_chunk(inputs, job, "damaged")
    chunk = chunk_dir_for(inputs / "damaged.parquet") / done[0]
    kept = chunk.read_bytes()
    from advalign.attacks.store import ChunkStore

    store = ChunkStore(chunk.parent, json.loads((chunk.parent / "job.json").read_text())["hash"])
    for kind, data in _damaged_copies(chunk).items():
        chunk.write_bytes(data)
        caplog.clear()
        assert store.load(0, 0, CHUNK, expected=("epsilon",)) is None, kind
        assert f"{chunk}: chunk " in caplog.text and "recomputing it" in caplog.text, (kind, caplog.text)
        assert not chunk.exists(), kind
    chunk.write_bytes(kept)
    chunk.write_bytes(_damaged_copies(chunk)["corrupt stream"])  # then the job itself meets one
    log = _finish(_start(inputs, job, "damaged"))
    assert f"{chunk}: chunk unreadable" in log and "recomputing it" in log, log[-2000:]
    assert (inputs / "damaged.parquet").read_bytes() == reference.read_bytes()
