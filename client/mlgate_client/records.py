"""Records to msgpack, one at a time, and batches of encoded records to request bodies.

Each record is encoded once, when it is handed to ``Producer.send``: its size is then
known exactly (for ``max_bytes`` and the buffer bound) and a batch body is just a
msgpack map header followed by the encoded records, joined without re-encoding. The
same bytes go out on every retry.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import struct
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

Features = Sequence[float] | Any  # a sequence of numbers, or anything with ``tolist()`` (numpy)
Metadata = Mapping[str, str | int | float | bool]
Timestamp = dt.datetime | float | int | str


def _plain(value: Any) -> Any:
    """numpy arrays and scalars as Python lists and numbers, for msgpack."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot encode {type(value).__name__} in a record")


def rfc3339(timestamp: Timestamp) -> str | float | int:
    """The wire form: datetimes as RFC 3339 UTC (naive ones taken as UTC); numbers
    (epoch seconds) and strings as given."""
    if isinstance(timestamp, dt.datetime):
        if timestamp.tzinfo is None:
            timestamp = timestamp.replace(tzinfo=dt.UTC)
        text = timestamp.astimezone(dt.UTC).isoformat(timespec="milliseconds")
        return text.replace("+00:00", "Z")
    return timestamp


class RecordEncoder:
    """Encodes records and makes ``record_id``s: a random per-encoder prefix and a
    counter, unique without coordination and cheap to make."""

    def __init__(self, single_float: bool = False) -> None:
        self._packer = msgpack.Packer(use_single_float=single_float, default=_plain)
        self._new_prefix()

    def _new_prefix(self) -> None:
        self._pid = os.getpid()
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def new_record_id(self) -> str:
        if os.getpid() != self._pid:
            # A forked process (a module-level producer under multiprocessing or a
            # prefork server) would go on from its parent's prefix and counter: its
            # records' ids repeat the parent's, taken for duplicates (a review).
            self._new_prefix()
        return f"{self._prefix}-{next(self._counter)}"

    def encode(
        self,
        record_id: str,
        features: Features,
        label: float | None,
        metadata: Metadata | None,
        timestamp: Timestamp | None,
    ) -> bytes:
        if hasattr(features, "tolist"):
            features = features.tolist()
        record: dict[str, Any] = {
            "record_id": record_id,
            "timestamp": time.time() if timestamp is None else rfc3339(timestamp),
            "features": features,
        }
        if label is not None:
            record["label"] = label
        if metadata:
            record["metadata"] = metadata
        return self._packer.pack(record)


def _array_header(length: int) -> bytes:
    if length < 16:
        return bytes((0x90 | length,))
    if length < 1 << 16:
        return b"\xdc" + struct.pack(">H", length)
    return b"\xdd" + struct.pack(">I", length)


def batch_prefix(source: str) -> bytes:
    """The bytes before the records array of ``{"source": source, "records": [...]}``."""
    return b"\x82" + msgpack.packb("source") + msgpack.packb(source) + msgpack.packb("records")


def batch_body(prefix: bytes, records: Sequence[bytes]) -> bytes:
    return b"".join((prefix, _array_header(len(records)), *records))
