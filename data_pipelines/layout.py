"""Fast decoding of a window of records that share one byte layout.

Every record of a dataset encodes the same fields with the same dtypes and shapes, so
its msgpack bytes (`schema.encode_record`) differ from another record's only inside the
arrays' data. A `Layout` is learned from one record that `schema.decode_record` and
`schema.validate_record` accepted: the data's byte ranges, and every other ("header")
byte. A record of the same length whose header bytes are equal parses to the same keys,
dtypes and shapes (msgpack is read from type tags and lengths, all in the header), so
it decodes and checks exactly as the full decoder would; T such records are decoded at
once with numpy, an order of magnitude faster than T msgpack decodes, checks and stacks.
A record that differs is left to the full decoder, which names what is wrong.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import msgpack
import numpy as np


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    start: int  # first byte of the array's data in the record
    stop: int
    dtype: np.dtype
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
    size: int  # bytes per record
    # The bytes outside the arrays' data, as runs (start, stop, the reference record's
    # bytes there): a few slices compare faster than a gather of scattered positions.
    header: tuple[tuple[int, int, np.ndarray], ...]
    fields: tuple[Field, ...]


def _data_ranges(data: bytes) -> dict[str, tuple[int, int]]:
    """Field name -> (start, stop) byte range of its array data in an encoded record."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    ranges = {}
    for _ in range(unpacker.read_map_header()):
        if unpacker.unpack() != "fields":
            unpacker.skip()
            continue
        for _ in range(unpacker.read_map_header()):
            name = unpacker.unpack()
            for _ in range(unpacker.read_map_header()):
                if unpacker.unpack() == "data":
                    payload = unpacker.unpack()
                    ranges[name] = (unpacker.tell() - len(payload), unpacker.tell())
                else:
                    unpacker.skip()
    return ranges


def learn(data: bytes, record: dict[str, np.ndarray]) -> Layout:
    """The layout of `data`, an encoded record, given `record` = its decoded (and
    checked) fields."""
    ranges = _data_ranges(data)
    is_header = np.ones(len(data), bool)
    for start, stop in ranges.values():
        is_header[start:stop] = False
    edges = np.flatnonzero(np.diff(np.concatenate([[False], is_header, [False]]).astype(np.int8)))
    reference = np.frombuffer(data, np.uint8)
    header = tuple((int(a), int(b), reference[a:b].copy()) for a, b in zip(edges[0::2], edges[1::2]))
    fields = tuple(Field(name, *ranges[name], record[name].dtype, record[name].shape) for name in record)
    return Layout(len(data), header, fields)


def decode_window(
    records: Sequence[bytes], layout: Layout, names: frozenset[str] | None = None
) -> dict[str, np.ndarray] | None:
    """The fields (all, or those in `names`) of T encoded records stacked to [T, ...]
    (e.g. frame uint8 [T, S, S, 3], action int32 [T]), as fresh writable arrays; None
    unless every record has `layout`'s length and header bytes."""
    if any(len(r) != layout.size for r in records):
        return None
    rows = np.frombuffer(b"".join(records), np.uint8).reshape(len(records), layout.size)
    if not all((rows[:, start:stop] == ref).all() for start, stop, ref in layout.header):
        return None
    # The copy makes each field contiguous and aligned before it is viewed as its dtype.
    return {
        f.name: rows[:, f.start : f.stop].copy().view(f.dtype).reshape((len(records), *f.shape))
        for f in layout.fields
        if names is None or f.name in names
    }
