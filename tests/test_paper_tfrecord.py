"""Our TFRecord reader against records written by an independent writer (PyPI `tfrecord`)."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from tfrecord.writer import TFRecordWriter

from advalign.data.tfrecord import iter_records, masked_crc32c, parse_example, read_record
from advalign.io import PipelineError
from paper_fixtures import write_shard


@pytest.fixture
def shard(tmp_path):
    data = [
        {"image": (b"\xff\xd8jpeg-bytes", "byte"), "label": (7, "int"), "score": ([0.5, -2.25], "float")},
        {"image": ([b"", b"second"], "byte"), "label": ([-3, 2**40, 0], "int")},
        {"label": (999, "int")},
    ]
    return write_shard(tmp_path / "val-0.tfrecords", data)


def test_reads_every_record_and_feature_kind(shard):
    records = list(iter_records(shard))
    assert [span.index for span, _ in records] == [0, 1, 2]
    first, second, third = (parse_example(payload) for _, payload in records)
    assert first == {"image": [b"\xff\xd8jpeg-bytes"], "label": [7], "score": [0.5, -2.25]}
    assert second == {"image": [b"", b"second"], "label": [-3, 2**40, 0]}  # negative int64 round-trips
    assert third == {"label": [999]}


def test_spans_locate_records_again(shard):
    records = list(iter_records(shard))
    for span, payload in reversed(records):
        assert read_record(shard, span) == payload
    assert records[1][0].offset == records[0][0].offset + 16 + records[0][0].length


def test_checksum_matches_the_independent_writer():
    rng = np.random.default_rng(0)
    for size in (0, 1, 8, 100, 4097):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert struct.pack("<I", masked_crc32c(data)) == TFRecordWriter.masked_crc(data)


def _corrupt(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def test_data_checksum_mismatch_is_an_error_naming_the_record(shard):
    spans = [span for span, _ in iter_records(shard)]
    _corrupt(shard, spans[1].offset + 12 + 3)  # a byte of record 1's payload
    with pytest.raises(PipelineError, match=r"record 1 at byte \d+: data checksum mismatch") as info:
        list(iter_records(shard))
    assert "\n" not in str(info.value)
    # Without verification the (wrong) bytes are returned: the checksums are what catches it.
    assert len(list(iter_records(shard, verify_crc=False))) == 3


def test_length_checksum_mismatch(shard):
    spans = [span for span, _ in iter_records(shard)]
    _corrupt(shard, spans[2].offset + 8)  # record 2's length checksum
    with pytest.raises(PipelineError, match="record 2 .*length checksum mismatch"):
        list(iter_records(shard))


def test_truncated_shard(shard):
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-3])
    with pytest.raises(PipelineError, match="record 2 .*truncated record"):
        list(iter_records(shard))
    shard.write_bytes(raw[:5])
    with pytest.raises(PipelineError, match="record 0 .*truncated header"):
        list(iter_records(shard))


def test_missing_shard(tmp_path):
    with pytest.raises(PipelineError, match="TFRecord shard not found"):
        list(iter_records(tmp_path / "train-9.tfrecords"))


def test_empty_file_has_no_records(tmp_path):
    path = tmp_path / "empty.tfrecords"
    path.write_bytes(b"")
    assert list(iter_records(path)) == []


def _key(number, wire):
    return bytes([number << 3 | wire])


def _len_delimited(number, payload: bytes) -> bytes:
    assert len(payload) < 128
    return _key(number, 2) + bytes([len(payload)]) + payload


def test_unpacked_repeated_scalars_are_accepted():
    # Int64List / FloatList written element by element (legal protobuf, not what TF writes).
    int64_list = _key(1, 0) + b"\x05" + _key(1, 0) + b"\x96\x01"  # 5, 150
    float_list = _key(1, 5) + struct.pack("<f", 1.5)
    entries = [
        _len_delimited(1, b"n") + _len_delimited(2, _len_delimited(3, int64_list)),
        _len_delimited(1, b"f") + _len_delimited(2, _len_delimited(2, float_list)),
    ]
    example = _len_delimited(1, b"".join(_len_delimited(1, e) for e in entries))
    assert parse_example(example) == {"n": [5, 150], "f": [1.5]}


def test_garbage_is_not_an_example():
    with pytest.raises(ValueError, match="not a tf.train.Example"):
        parse_example(b"\x0a\xff\xff")  # a field claiming more bytes than there are
    with pytest.raises(ValueError, match="not a tf.train.Example"):
        parse_example(b"\x0b")  # wire type 3 (groups)


def test_large_records_stream(tmp_path):
    payload = os.urandom(300_000)
    path = write_shard(tmp_path / "big.tfrecords", [{"image": (payload, "byte"), "label": (1, "int")}] * 3)
    got = [parse_example(p)["image"][0] for _, p in iter_records(path)]
    assert got == [payload] * 3
