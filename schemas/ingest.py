"""Ingestion wire types: the batch a producer posts and the answer it gets.

Inbound types are frozen, forbid unknown fields and carry their static bounds in
``Meta``; bounds that depend on settings (allowed dimensions, value range, batch size)
are checked by ``service.ingest.validation``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Annotated, overload

import msgspec
import numpy as np

SCHEMA_VERSION = "1"

MAX_FEATURES = 4096
MAX_METADATA_ITEMS = 32
MAX_METADATA_TEXT = 1024  # characters
MAX_METADATA_KEY = 64  # characters
MAX_RECORDS = 100_000

# ``$(?!\n)``: Python's ``$`` also matches before a final newline; ECMA's does not need it.
RecordId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$(?!\n)")]
# A ``RecordId`` without its pattern, for ``PackedRecord``: msgspec runs a pattern
# through Python's ``re`` for each value (0.45 µs a record); the packed path checks a
# whole batch's ids at once instead (``service.ingest.validation``).
UncheckedRecordId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
# (?!\n): Python's $ also matches before a final newline.
SOURCE_PATTERN = r"^[A-Za-z0-9._:-]+$(?!\n)"
SourceName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=128, pattern=SOURCE_PATTERN)
]
MetadataKey = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_METADATA_KEY)]
MetadataText = Annotated[str, msgspec.Meta(max_length=MAX_METADATA_TEXT)]
# A signed 64-bit integer: what a msgpack value can carry and a consumer in Java or Go
# can read (a review: 2**70 passed, then failed the msgpack value encoder with a 500).
# JSON Schema cannot tell an integer literal from a float of the same value, so the
# schema's ``number`` branch takes 2**63 written as an integer: the description says.
MetadataInt = Annotated[
    int,
    msgspec.Meta(
        ge=-(2**63),
        le=2**63 - 1,
        description=(
            "An integer written without a fraction or exponent must be within signed 64 "
            "bits; one outside is refused, not read as a float (write 9.3e18 for a float)"
        ),
    ),
]
MetadataValue = MetadataText | MetadataInt | float | bool
Timestamp = (
    Annotated[datetime, msgspec.Meta(tz=True, description="RFC 3339 with an offset (a space in place of the T, and an offset without its colon, +0100, taken too), its UTC moment within the years 0001-9999")]
    # From 0001-01-01, as far back as RFC 3339 goes (a review: pre-1970 text was taken
    # and the same moment in epoch seconds refused).
    | Annotated[float, msgspec.Meta(ge=-62135596800, le=1e11, description="epoch seconds")]
)
Features = Annotated[list[float], msgspec.Meta(min_length=1, max_length=MAX_FEATURES)]
# A float that is not NaN nor infinite, for ``PackedRecord``: msgspec refuses the rest
# as it decodes (NaN fails any comparison), so the packed path needs no check of its
# own; the record-by-record path then names the record and its problem.
FiniteFloat = Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=sys.float_info.max)]
FiniteMetadataValue = MetadataText | MetadataInt | FiniteFloat | bool


# gc=False: a batch makes hundreds of these and none can be part of a reference cycle,
# so the garbage collector need not track them.
class Record(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """One training record as a producer sends it."""

    features: Features
    record_id: RecordId | None = None
    timestamp: Timestamp | None = None
    label: float | None = None
    metadata: Annotated[
        dict[MetadataKey, MetadataValue], msgspec.Meta(max_length=MAX_METADATA_ITEMS)
    ] = {}


class RecordIdOnly(msgspec.Struct, frozen=True, gc=False):
    """Internal: a record's ``record_id`` alone, read from a record that does not fit
    ``Record`` so that its rejection can name it. Never on the wire."""

    record_id: RecordId | None = None


class TextRecord(Record, frozen=True, kw_only=True, gc=False):
    """Internal: a ``Record`` decoded from JSON with the text its features came as, so
    the JSON Kafka value can carry that text instead of formatting every float again
    (see ``service.ingest.validation``). Never on the wire or in the OpenAPI document."""

    features_text: msgspec.Raw


class FeaturesText(Sequence[float]):
    """Internal: a record's feature values (a list, or its row of the batch's matrix) and
    the JSON text they were sent as (an array of the same numbers); the JSON value
    encoder writes the text as it is."""

    __slots__ = ("text", "values")

    def __init__(self, values: list[float] | np.ndarray, text: msgspec.Raw) -> None:
        self.values, self.text = values, text

    def __len__(self) -> int:
        return len(self.values)

    @overload
    def __getitem__(self, index: int) -> float: ...
    @overload
    def __getitem__(self, index: slice) -> list[float]: ...
    def __getitem__(self, index: int | slice) -> float | list[float]:
        if isinstance(self.values, np.ndarray):
            picked = self.values[index]
            return picked.tolist() if isinstance(index, slice) else float(picked)
        return self.values[index]

    def __iter__(self) -> Iterator[float]:
        return iter(self.values)


class FeaturesPacked(FeaturesText):
    """Internal: ``FeaturesText`` whose ``text`` is the msgpack array of float 64s the
    record was packed with; the msgpack value encoder writes those bytes as they are."""

    __slots__ = ()


class IngestRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    source: SourceName
    records: Annotated[list[Record], msgspec.Meta(min_length=1, max_length=MAX_RECORDS)]


class PackedRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """Internal: a ``Record`` with its features left as they were encoded: msgpack bytes,
    read as one numpy matrix per batch when every record packs them alike, or JSON text,
    decoded on its own and kept for the Kafka value (see ``service.ingest.validation``).
    Never on the wire or in the OpenAPI document."""

    features: msgspec.Raw
    record_id: UncheckedRecordId | None = None
    timestamp: Timestamp | None = None
    label: FiniteFloat | None = None
    metadata: Annotated[
        dict[MetadataKey, FiniteMetadataValue], msgspec.Meta(max_length=MAX_METADATA_ITEMS)
    ] = {}


class PackedRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Internal: ``IngestRequest`` with ``PackedRecord``s."""

    source: SourceName
    records: Annotated[list[PackedRecord], msgspec.Meta(min_length=1, max_length=MAX_RECORDS)]


class IngestEnvelope(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The batch with its records left undecoded, so each can fail on its own."""

    source: SourceName
    records: Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1, max_length=MAX_RECORDS)]


class RecordError(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    record_id: str | None
    error: str


class IngestResponse(msgspec.Struct, frozen=True, kw_only=True):
    tracking_id: str
    records_accepted: int
    records_rejected: int
    records_duplicate: int
    errors: list[RecordError]


class StoredRecord(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The record as written to the sink (the Kafka message value).

    ``features`` is a list, a row of the batch's numpy matrix when the batch came as
    packed msgpack floats, or the values with the JSON text they came as
    (``service.ingest.validation``); each encodes as the same array of numbers. ``timestamp`` is RFC 3339 UTC text, or a UTC datetime where the
    encoder writes it as that text (JSON)."""

    record_id: str
    timestamp: datetime | str
    features: list[float] | np.ndarray | FeaturesText
    label: float | None
    metadata: dict[str, str | int | float | bool]
    source: str
