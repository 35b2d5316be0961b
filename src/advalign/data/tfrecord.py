"""Read TFRecord files of ``tf.train.Example`` records without TensorFlow.

A TFRecord file is a sequence of records, each framed as::

    uint64  length                      (little endian)
    uint32  masked_crc32c(length bytes)
    bytes   data[length]
    uint32  masked_crc32c(data)

with ``masked_crc32c(x) = ((c >> 15) | (c << 17)) + 0xa282ead8`` (mod 2**32) where
``c`` is the CRC-32C (Castagnoli) of ``x``. Both checksums are verified by default,
so a truncated or bit-flipped shard is an error naming the file, the record and
the byte offset, never silently wrong data.

The record payload of an ``Example`` is protobuf wire format; the few messages
involved (Example, Features, Feature, BytesList, FloatList, Int64List) are
decoded here directly. Packed and unpacked repeated scalars are both accepted,
as the protobuf specification requires of a parser.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import google_crc32c

from ..io import PipelineError

_HEADER = struct.Struct("<QI")  # length, masked crc of the length
_FOOTER = struct.Struct("<I")  # masked crc of the data
_MASK_DELTA = 0xA282EAD8

# Wire types of the protobuf encoding.
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


def masked_crc32c(data: bytes) -> int:
    """The checksum TFRecord stores: CRC-32C rotated right by 15 bits plus a constant."""
    crc = google_crc32c.value(bytes(data))
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


@dataclass(frozen=True)
class RecordSpan:
    """Where one record lies in its file: its position in the file and its payload."""

    index: int  # 0-based record number within the file
    offset: int  # byte offset of the record's header
    length: int  # payload bytes


def iter_records(path: str | Path, verify_crc: bool = True) -> Iterator[tuple[RecordSpan, bytes]]:
    """Yield ``(span, payload)`` for every record of a TFRecord file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: TFRecord shard not found")
    with open(path, "rb") as fh:
        index = 0
        while True:
            offset = fh.tell()
            header = fh.read(_HEADER.size)
            if not header:
                return
            where = f"{path}: record {index} at byte {offset}"
            if len(header) < _HEADER.size:
                raise PipelineError(f"{where}: truncated header ({len(header)} of {_HEADER.size} bytes)")
            length, length_crc = _HEADER.unpack(header)
            if verify_crc and masked_crc32c(header[:8]) != length_crc:
                raise PipelineError(f"{where}: length checksum mismatch (corrupt or not a TFRecord file)")
            payload = fh.read(length)
            footer = fh.read(_FOOTER.size)
            if len(payload) < length or len(footer) < _FOOTER.size:
                raise PipelineError(f"{where}: truncated record (file ends inside a {length}-byte record)")
            if verify_crc and masked_crc32c(payload) != _FOOTER.unpack(footer)[0]:
                raise PipelineError(f"{where}: data checksum mismatch (corrupt shard)")
            yield RecordSpan(index, offset, length), payload
            index += 1


def scan_records(path: str | Path) -> list[RecordSpan]:
    """The spans of every record of a TFRecord file, from the record headers alone.

    Seeks past the payloads instead of reading them, so indexing a large shard costs one
    small read per record; the length checksum of every header is still verified, and
    :func:`read_record` verifies a payload when it is read.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: TFRecord shard not found")
    size = path.stat().st_size
    spans = []
    with open(path, "rb") as fh:
        offset = 0
        while offset < size:
            where = f"{path}: record {len(spans)} at byte {offset}"
            fh.seek(offset)
            header = fh.read(_HEADER.size)
            if len(header) < _HEADER.size:
                raise PipelineError(f"{where}: truncated header ({len(header)} of {_HEADER.size} bytes)")
            length, length_crc = _HEADER.unpack(header)
            if masked_crc32c(header[:8]) != length_crc:
                raise PipelineError(f"{where}: length checksum mismatch (corrupt or not a TFRecord file)")
            end = offset + _HEADER.size + length + _FOOTER.size
            if end > size:
                raise PipelineError(f"{where}: truncated record (file ends inside a {length}-byte record)")
            spans.append(RecordSpan(len(spans), offset, length))
            offset = end
    return spans


def read_record(path: str | Path, span: RecordSpan, verify_crc: bool = True) -> bytes:
    """Read one record again from its span (found by :func:`iter_records`)."""
    path = Path(path)
    where = f"{path}: record {span.index} at byte {span.offset}"
    try:
        with open(path, "rb") as fh:
            fh.seek(span.offset)
            header = fh.read(_HEADER.size)
            payload = fh.read(span.length)
            footer = fh.read(_FOOTER.size)
    except FileNotFoundError:
        raise PipelineError(f"{path}: TFRecord shard not found") from None
    if len(header) < _HEADER.size or len(payload) < span.length or len(footer) < _FOOTER.size:
        raise PipelineError(f"{where}: truncated record (the shard changed since it was indexed?)")
    length, length_crc = _HEADER.unpack(header)
    if length != span.length:
        raise PipelineError(f"{where}: record length changed since the shard was indexed")
    if verify_crc and (
        masked_crc32c(header[:8]) != length_crc or masked_crc32c(payload) != _FOOTER.unpack(footer)[0]
    ):
        raise PipelineError(f"{where}: checksum mismatch (corrupt shard)")
    return payload


# ---------------------------------------------------------------------------
# tf.train.Example
# ---------------------------------------------------------------------------


class _WireError(ValueError):
    pass


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _WireError("varint longer than 10 bytes")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, object]]:
    """Yield ``(field number, wire type, value)`` of one message; value is an int
    (varint), a memoryview (length-delimited) or raw bytes (fixed32/fixed64)."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire == _LENGTH_DELIMITED:
            size, pos = _read_varint(buf, pos)
            if pos + size > len(buf):
                raise _WireError("length-delimited field runs past the end of its message")
            value, pos = buf[pos : pos + size], pos + size
        elif wire == _FIXED32:
            if pos + 4 > len(buf):
                raise _WireError("truncated fixed32")
            value, pos = bytes(buf[pos : pos + 4]), pos + 4
        elif wire == _FIXED64:
            if pos + 8 > len(buf):
                raise _WireError("truncated fixed64")
            value, pos = bytes(buf[pos : pos + 8]), pos + 8
        else:
            raise _WireError(f"unsupported wire type {wire}")
        yield number, wire, value


def _as_int64(value: int) -> int:
    # int64 travels as its 64-bit two's complement.
    value &= 0xFFFFFFFFFFFFFFFF
    return value - (1 << 64) if value >= 1 << 63 else value


def _bytes_list(buf: memoryview) -> list[bytes]:
    return [bytes(v) for n, w, v in _fields(buf) if n == 1 and w == _LENGTH_DELIMITED]


def _float_list(buf: memoryview) -> list[float]:
    values: list[float] = []
    for number, wire, value in _fields(buf):
        if number != 1:
            continue
        if wire == _LENGTH_DELIMITED:  # packed
            if len(value) % 4:
                raise _WireError("packed float list length is not a multiple of 4")
            values.extend(struct.unpack(f"<{len(value) // 4}f", value))
        elif wire == _FIXED32:
            values.append(struct.unpack("<f", value)[0])
    return values


def _int64_list(buf: memoryview) -> list[int]:
    values: list[int] = []
    for number, wire, value in _fields(buf):
        if number != 1:
            continue
        if wire == _LENGTH_DELIMITED:  # packed
            pos = 0
            while pos < len(value):
                item, pos = _read_varint(value, pos)
                values.append(_as_int64(item))
        elif wire == _VARINT:
            values.append(_as_int64(value))
    return values


_KINDS = {1: _bytes_list, 2: _float_list, 3: _int64_list}


def _feature(buf: memoryview) -> list:
    kind = None
    for number, wire, value in _fields(buf):
        if number in _KINDS and wire == _LENGTH_DELIMITED:
            kind = _KINDS[number](value)  # oneof: the last one set wins
    return [] if kind is None else kind


def parse_example(payload: bytes) -> dict[str, list]:
    """Decode a serialized ``tf.train.Example`` into ``{feature name: list of values}``.

    Values are ``bytes`` (BytesList), ``float`` (FloatList) or ``int`` (Int64List).
    Raises ``ValueError`` on malformed input; callers add where it came from.
    """
    features: dict[str, list] = {}
    try:
        for number, wire, value in _fields(memoryview(payload)):
            if number != 1 or wire != _LENGTH_DELIMITED:  # Example.features
                continue
            for f_number, f_wire, entry in _fields(value):
                if f_number != 1 or f_wire != _LENGTH_DELIMITED:  # Features.feature (a map entry)
                    continue
                key, feature = "", []
                for e_number, e_wire, e_value in _fields(entry):
                    if e_number == 1 and e_wire == _LENGTH_DELIMITED:
                        key = bytes(e_value).decode("utf-8")
                    elif e_number == 2 and e_wire == _LENGTH_DELIMITED:
                        feature = _feature(e_value)
                features[key] = feature
    except (_WireError, UnicodeDecodeError, struct.error) as exc:
        raise ValueError(f"not a tf.train.Example ({exc})") from None
    return features


# ---------------------------------------------------------------------------
# Writing (the photo benchmark's ClickMe-format shards, advalign.data.photos)
# ---------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # negative int64 values are written as their two's complement
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | _LENGTH_DELIMITED) + _varint(len(payload)) + payload


def encode_example(features: dict[str, list]) -> bytes:
    """Serialize ``{name: [bytes, ...] | [int, ...]}`` as a ``tf.train.Example`` (BytesList for
    bytes values, packed Int64List for ints), feature names in sorted order."""
    entries = b""
    for name in sorted(features):
        values = list(features[name])
        if all(isinstance(v, (bytes, bytearray)) for v in values):
            inner = _length_delimited(1, b"".join(_length_delimited(1, bytes(v)) for v in values))
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            packed = b"".join(_varint(v) for v in values)
            inner = _length_delimited(3, _length_delimited(1, packed))
        else:
            raise ValueError(f"feature {name!r}: values must be all bytes or all int")
        entry = _length_delimited(1, name.encode("utf-8")) + _length_delimited(2, inner)
        entries += _length_delimited(1, entry)
    return _length_delimited(1, entries)


def frame_record(payload: bytes) -> bytes:
    """One TFRecord frame: length, its masked CRC, the payload, its masked CRC."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", masked_crc32c(length)) + payload + _FOOTER.pack(masked_crc32c(payload))
