"""RecordValidator: per-record validation of an ingest batch, with partial success.

A batch is decoded in one pass when every record is well-formed (the fast path);
otherwise each record is decoded on its own so a malformed one costs only itself.
Then the checks that depend on settings run: allowed feature dimensions, finite
values, the configured value range; then, when the validator was given a
``QualityScreen``, the source's feature profile (service.ingest.quality_screen). Accepted
records come out encoded for the sink, flagged ones with a ``quality_flags`` header.
"""

from __future__ import annotations

import math
import operator
import re
import uuid
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import numpy as np
import orjson
import simdjson

from mlgate.config import Settings
from mlgate.schemas.ingest import (
    MAX_FEATURES,
    MAX_METADATA_KEY,
    Features,
    FeaturesPacked,
    FeaturesText,
    IngestEnvelope,
    IngestRequest,
    MetadataValue,
    PackedRecord,
    PackedRequest,
    Record,
    RecordError,
    RecordIdOnly,
    StoredRecord,
    TextRecord,
)
from mlgate.schemas.problem import FieldError
from mlgate.service.http.codec import (
    SIMDJSON_REFUSALS,
    Format,
    bounded,
    decode,
    json_outline,
    location,
    outline_refusal,
    raise_parser_misuse,
    top_level_length,
    undecodable,
)
from mlgate.service.http.errors import ValidationFailed
from mlgate.service.ingest.batch import ValidatedBatch
from mlgate.service.ingest.quality_screen import QUALITY_FLAGS_HEADER, QualityScreen
from mlgate.workers.sinks.records import OutboundRecord


def _decoders(type_: Any) -> dict[Format, Any]:
    """A decoder of ``type_`` for each body format."""
    return {Format.JSON: msgspec.json.Decoder(type_), Format.MSGPACK: msgspec.msgpack.Decoder(type_)}


_batch_decoders = _decoders(IngestRequest)
_packed_decoder = msgspec.msgpack.Decoder(PackedRequest)
_json_packed_decoder = msgspec.json.Decoder(PackedRequest)
_json_features_decoder = msgspec.json.Decoder(Features)
# A msgpack float 64 / float 32: its type byte, then the big-endian value.
_FLOAT64 = np.dtype([("tag", "u1"), ("value", ">f8")])
_FLOAT32 = np.dtype([("tag", "u1"), ("value", ">f4")])
_FLOAT64_TAG = 0xCB
_TAGS = {9: (_FLOAT64_TAG, _FLOAT64), 5: (0xCA, _FLOAT32)}
Decoded = Record | PackedRecord | RecordError
_record_decoders = _decoders(Record)
_record_id_decoders = _decoders(RecordIdOnly)
_envelope_decoders = _decoders(IngestEnvelope)


# The packed path's numpy set-up costs more than it saves on a few records (one record
# of 128 features is ~1.3 KB of msgpack): smaller bodies decode record by record.
PACKED_FROM_BYTES = 16 * 1024
# The largest JSON features text the validator's own simdjson parser takes (its buffers
# stay as large as the largest document it parsed); larger ones get a parser of their own.
PARSER_KEEPS_BYTES = 2 * 1024 * 1024


class PackedRecords(list[PackedRecord]):
    """The records of a batch that packs every record's features alike, with the
    matrix of those features that ``decode_batch`` read to find so (row per record).
    ``texts``: the records are JSON, their features the text they came as, which a
    JSON value keeps; ``float64s``: msgpack float 64s, the bytes a msgpack value keeps
    (float 32s are written as float 64s, as for any other batch)."""

    def __init__(
        self,
        records: list[PackedRecord],
        matrix: np.ndarray,
        *,
        texts: bool = False,
        float64s: bool = False,
    ) -> None:
        super().__init__(records)
        self.matrix = matrix
        self.texts = texts
        self.float64s = float64s


TIMESTAMP_OUT_OF_RANGE = "timestamp is out of range once converted to UTC (years 1 to 9999)"

class RecordValidator:
    def __init__(self, settings: Settings, quality: QualityScreen | None = None) -> None:
        self._settings = settings
        self._quality = quality
        self._dims = frozenset(settings.feature_dims)
        self._min = settings.feature_min
        self._max = settings.feature_max
        self._value_encoder: msgspec.json.Encoder | msgspec.msgpack.Encoder = (
            msgspec.msgpack.Encoder(enc_hook=_msgpack_row)
            if settings.value_format == "msgpack"
            else msgspec.json.Encoder(enc_hook=_json_row)
        )
        self._schema_version = settings.schema_version.encode()
        # A JSON batch's features go to a JSON value as the text they came as: the same
        # numbers (JSON has one number type), without formatting 128 floats again.
        self._keeps_features_text = settings.value_format == "json"
        # Likewise a packed msgpack batch's features go to a msgpack value as the bytes
        # they came as: no Python float per value, nothing encoded again.
        self._keeps_packed_features = settings.value_format == "msgpack"
        self._json_parser = simdjson.Parser(max_capacity=PARSER_KEEPS_BYTES)
        # The stored timestamp is RFC 3339 UTC text either way. msgspec's JSON encoder
        # writes a UTC datetime exactly so (``...T13:42:57.039000Z``), in C; msgpack
        # would write its timestamp extension instead, so that format gets the text.
        self._stamp: Callable[[datetime], datetime | str] = (
            _rfc3339 if settings.value_format == "msgpack" else _as_is
        )

    # -- decoding ---------------------------------------------------------------------

    def decode_batch(self, body: bytes, fmt: Format) -> tuple[str, Sequence[Decoded]]:
        """The source and, per index, a decoded record or the reason it was rejected.

        A msgpack batch whose records all pack their features alike (the same number of
        float 64s, or of float 32s) decodes them as bytes (``PackedRecord``), which
        ``validate`` reads as one matrix: no Python float per value until needed. Any
        other batch decodes as ``IngestRequest``, so what is accepted or rejected, and
        why, is the same either way.

        Bytes that are not JSON / msgpack at all are 400 even when msgspec meets a
        schema error first: the envelope decoding (``codec.decode``) tells them apart."""
        limit = self._settings.max_batch_records
        if fmt is Format.JSON and len(body) > MAX_BATCH_RECORD_BYTES:
            # msgpack states its arrays' lengths up front, and msgspec refuses one over
            # the limit before building it; a JSON array is counted first.
            sent = json_outline(body, _records_sent, _records_sent_in_bytes)
            if sent is not None and sent > limit:
                raise _too_many(sent, limit)
        envelope = _envelope(body, fmt) if len(body) > MAX_BATCH_RECORD_BYTES else None
        if envelope is not None:
            # msgspec refuses a msgpack array past the schema's widest bound before
            # building it, not past the configured one: counted here, each record left
            # as bytes (a review: 64,000 records of 32 metadata items were built twice,
            # 1.3 s of the loop and 450 MB, before their 422). So a string of invalid
            # UTF-8 inside a record goes unseen: 422, not the 400 a full decode finds
            # (README says so).
            if len(envelope.records) > limit:
                raise _too_many(len(envelope.records), limit)
            if any(len(record) > MAX_BATCH_RECORD_BYTES for record in envelope.records):
                # Only the record-by-record path measures records: the others would take
                # a record it refuses, its fate hanging on its neighbours (a review).
                source, measured = self._one_by_one(body, fmt)
                return source, self._at_most(measured, limit)
        if fmt is Format.MSGPACK and len(body) >= PACKED_FROM_BYTES:
            try:
                packed: PackedRequest = _packed_decoder.decode(body)
            except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
                pass
            else:
                read = (
                    _feature_matrix(packed.records)
                    if len(packed.records) <= limit and _ids_visible_ascii(packed.records)
                    else None
                )
                if read is not None:
                    matrix, float64s = read
                    return packed.source, PackedRecords(packed.records, matrix, float64s=float64s)
        schema_failed = False
        if fmt is Format.JSON and self._keeps_features_text:
            try:
                texts = self._with_features_text(body, limit)
            except _SchemaFailed:
                # The whole batch's typed decoding would fail as well: straight to
                # record by record (a review: a record of a million metadata keys was
                # built three times over, 1.1 s of the event loop).
                schema_failed = True
            else:
                if texts is not None:
                    return texts
        items: list[Decoded]
        try:
            if schema_failed:
                source, items = self._one_by_one(body, fmt)
            else:
                batch: IngestRequest = _batch_decoders[fmt].decode(body)
                items = list(batch.records)
                source = batch.source
        except msgspec.ValidationError:
            source, items = self._one_by_one(body, fmt)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise undecodable(exc, fmt) from None
        return source, self._at_most(items, limit)

    @staticmethod
    def _at_most(items: list[Decoded], limit: int) -> list[Decoded]:
        if len(items) > limit:
            raise _too_many(len(items), limit)
        return items

    def _with_features_text(self, body: bytes, limit: int) -> tuple[str, Sequence[Decoded]] | None:
        """A JSON batch's records, each with the text of its features: the batch decoded
        with features left as text, then the features of all records parsed at once
        into one matrix (``_json_feature_matrix``) or, where they are not all flat
        arrays of numbers of one length, each record's on its own. None when anything
        does not decode, so the batch takes the general path and fails there with the
        same messages as always."""
        try:
            packed: PackedRequest = _json_packed_decoder.decode(body)
            if len(packed.records) > limit or not _ids_visible_ascii(packed.records):
                return None
            if len(body) >= PACKED_FROM_BYTES:
                parsed = self._json_feature_matrix(packed.records)
                if parsed is not None:
                    matrix, points = parsed
                    return packed.source, PackedRecords(packed.records, matrix, texts=points)
            decode = _json_features_decoder.decode
            items: list[Decoded] = [
                TextRecord(
                    features=decode(record.features),
                    record_id=record.record_id,
                    timestamp=record.timestamp,
                    label=record.label,
                    metadata=record.metadata,
                    features_text=record.features,
                )
                for record in packed.records
            ]
        except msgspec.ValidationError:
            raise _SchemaFailed from None
        except (msgspec.DecodeError, RecursionError):
            return None
        return packed.source, items

    def _one_by_one(self, body: bytes, fmt: Format) -> tuple[str, list[Decoded]]:
        """The batch decoded record by record, each failing on its own (partial success)."""
        envelope = decode(body, IngestEnvelope, fmt)
        return envelope.source, [self._decode_one(i, raw, fmt) for i, raw in enumerate(envelope.records)]

    def _json_feature_matrix(
        self, records: Sequence[PackedRecord]
    ) -> tuple[np.ndarray, bool] | None:
        """The records' JSON features as one float64 matrix, row per record, parsed by
        simdjson in one pass (about half what msgspec takes to make a Python float of
        each value, and no floats to check one by one). None unless every record's
        features are a flat array of numbers and all have one length within the
        schema's: the per-record path then decides, with its messages.

        The values are those msgspec decodes (both round correctly; ints become
        floats); a number msgspec would make infinite is a parse error here. With the
        matrix: whether the records' texts may be their values' features
        (``_text_stands_for``, each record's length and the batch's points)."""
        count = len(records)
        joined = b"".join([b"[", b",".join([record.features for record in records]), b"]"])
        # One bracket a record and the outer one: no nested arrays (nor brackets in
        # strings, which are not numbers anyway).
        if joined.count(b"[") != count + 1:
            return None
        # A parser keeps the buffers of the largest document it parsed (~14 bytes a
        # number): one made for a larger document alone lets them go with it.
        own = len(joined) <= PARSER_KEEPS_BYTES
        try:
            matrix = _flat_rows(self._json_parser if own else simdjson.Parser(), joined, count)
        except RuntimeError:  # its parser still referenced (it cannot be): a new one
            self._json_parser = simdjson.Parser(max_capacity=PARSER_KEEPS_BYTES)
            return None
        if matrix is None:
            return None
        # Each record's text no longer than its numbers written plainly: over the whole
        # batch, compact neighbours' room covered one record's padding (a review).
        longest = max(map(len, (record.features for record in records)))
        return matrix, _plain_length(longest, matrix.shape[1]) and _all_points(joined, matrix.size)

    def _decode_one(self, index: int, raw: msgspec.Raw, fmt: Format) -> Record | RecordError:
        """One record of a batch; one over ``MAX_BATCH_RECORD_BYTES`` is rejected without
        being decoded: what a JSON object holds is counted against the schema only once
        it is built."""
        limit = MAX_BATCH_RECORD_BYTES
        if len(raw) > limit:
            return RecordError(
                index=index, record_id=None, error=f"the record's {len(raw)} bytes exceed the limit of {limit}"
            )
        try:
            record: Record = _record_decoders[fmt].decode(raw)
            return record
        except msgspec.ValidationError as exc:
            return record_error(index, exc, given_record_id(raw, fmt), raw, fmt)
        except (msgspec.DecodeError, RecursionError) as exc:
            # Bytes the envelope framed but that do not decode (invalid UTF-8 in a
            # msgpack string): the body is undecodable, 400, wherever the record is
            # (a review: after a schema error in an earlier record it was that
            # record's rejection, before one the batch's 400).
            raise undecodable(exc, fmt) from None

    # -- semantic checks --------------------------------------------------------------

    def validate(self, source: str, items: Sequence[Decoded]) -> ValidatedBatch:
        accepted: list[StoredRecord] = []
        errors: list[RecordError] = []
        generated: list[str] = []
        # Records without a timestamp get the batch's arrival time (one clock read, one
        # isoformat per batch rather than per record).
        received = self._stamp(datetime.now(UTC))
        if isinstance(items, PackedRecords):
            self._validate_packed(source, items, received, accepted, errors, generated)
        else:
            for index, item in enumerate(items):
                if isinstance(item, RecordError):
                    # Indexes are positions in ``items``; the stream route offsets them.
                    errors.append(
                        item if item.index == index else msgspec.structs.replace(item, index=index)
                    )
                    continue
                assert isinstance(item, Record)
                problem = self._check(item.features, item.label, item.metadata)
                if problem is not None:
                    errors.append(RecordError(index=index, record_id=item.record_id, error=problem))
                    continue
                features: list[float] | FeaturesText = item.features
                if isinstance(item, TextRecord) and _text_stands_for(item.features_text, len(features)):
                    features = FeaturesText(item.features, item.features_text)
                self._keep(index, source, item, features, received, accepted, errors, generated)
        batch = ValidatedBatch(
            source=source, accepted=accepted, errors=errors, generated_ids=frozenset(generated)
        )
        return batch if self._quality is None else self._quality.screen(batch)

    def _validate_packed(
        self,
        source: str,
        records: PackedRecords,
        received: datetime | str,
        accepted: list[StoredRecord],
        errors: list[RecordError],
        generated: list[str],
    ) -> None:
        """``validate`` for a batch of ``PackedRecord``s: the feature checks run on the
        batch's matrix at once, and only a row that fails one goes through ``_check``,
        which names its problem as for any other record."""
        matrix = records.matrix
        dims = matrix.shape[1]
        failing = ~np.isfinite(matrix).all(axis=1)
        if self._min is not None:
            failing |= matrix.min(axis=1) < self._min
        if self._max is not None:
            failing |= matrix.max(axis=1) > self._max
        suspects = set(np.flatnonzero(failing).tolist()) if dims in self._dims else None
        # Accepted records keep their row of the matrix (a view): no Python float per
        # value, and the JSON value encoder formats the row in one call (``_json_row``;
        # formatting the whole matrix at once and keeping views of its text was no
        # faster: stop 22).
        for index, (item, row) in enumerate(zip(records, matrix, strict=True)):
            # Labels and metadata floats are finite (``FiniteFloat``): only the features
            # of a row that failed a check of the matrix are looked at again.
            if suspects is None or index in suspects:
                problem = self._check(row.tolist(), item.label, item.metadata)
                if problem is not None:
                    errors.append(RecordError(index=index, record_id=item.record_id, error=problem))
                    continue
            if records.texts:
                features: np.ndarray | FeaturesText = FeaturesText(row, item.features)
            elif records.float64s and self._keeps_packed_features:
                features = FeaturesPacked(row, item.features)
            else:
                features = row
            self._keep(index, source, item, features, received, accepted, errors, generated)

    def _check(
        self,
        features: list[float],
        label: float | None,
        metadata: dict[str, str | int | float | bool],
    ) -> str | None:
        if len(features) not in self._dims:
            return dimension_error(len(features), self._dims)
        # One sum is finite exactly when every value is, unless finite values overflow:
        # only then is the slow per-value scan needed.
        if not math.isfinite(sum(features)) and not all(map(math.isfinite, features)):
            bad = next(i for i, v in enumerate(features) if not math.isfinite(v))
            return f"features[{bad}] is not a finite number"
        problem = self._check_scalars(label, metadata)
        if problem is not None:
            return problem
        if self._min is not None and min(features) < self._min:
            return f"features has a value below the allowed minimum {self._min}"
        if self._max is not None and max(features) > self._max:
            return f"features has a value above the allowed maximum {self._max}"
        return None

    @staticmethod
    def _check_scalars(
        label: float | None, metadata: dict[str, str | int | float | bool]
    ) -> str | None:
        if label is not None and not math.isfinite(label):
            return "label is not a finite number"
        for key, value in metadata.items():
            if isinstance(value, float) and not math.isfinite(value):
                # JSON has no NaN/inf: stored, it would silently turn into null.
                return f"metadata[{key!r}] is not a finite number"
        return None

    def _keep(
        self,
        index: int,
        source: str,
        record: Record | PackedRecord,
        features: list[float] | np.ndarray | FeaturesText,
        received: datetime | str,
        accepted: list[StoredRecord],
        errors: list[RecordError],
        generated: list[str],
    ) -> None:
        """The record to ``accepted`` as stored, or to ``errors`` when its timestamp
        has no UTC time (an offset past year 1 or 9999: ``9999-12-31T23:59:59-01:00``)."""
        try:
            accepted.append(self._stored(source, record, features, received, generated))
        except OverflowError:
            errors.append(RecordError(index=index, record_id=record.record_id, error=TIMESTAMP_OUT_OF_RANGE))

    def _stored(
        self,
        source: str,
        record: Record | PackedRecord,
        features: list[float] | np.ndarray | FeaturesText,
        received: datetime | str,
        generated: list[str],
    ) -> StoredRecord:
        """The record as stored; the id made for a record sent without one is added to
        ``generated``. OverflowError for a timestamp with no UTC time."""
        stamp = record.timestamp
        if stamp is None:
            timestamp = received
        elif isinstance(stamp, datetime):
            # msgspec decodes a ``Z`` as ``UTC`` itself: no conversion needed then.
            timestamp = self._stamp(stamp if stamp.tzinfo is UTC else stamp.astimezone(UTC))
        else:
            timestamp = self._stamp(datetime.fromtimestamp(stamp, UTC))
        record_id = record.record_id
        if record_id is None:
            record_id = uuid.uuid4().hex
            generated.append(record_id)
        return StoredRecord(
            record_id=record_id,
            timestamp=timestamp,
            features=features,
            label=record.label,
            metadata=record.metadata,
            source=source,
        )

    def observe_written(self, screened: ValidatedBatch, written: ValidatedBatch) -> None:
        """``screened``'s rows for the drift monitor, but those of records ``written``
        left out as duplicates (``QualityScreen.observe_written``)."""
        if self._quality is not None:
            self._quality.observe_written(screened, written)

    # -- encoding for the sink --------------------------------------------------------

    def outbound(self, batch: ValidatedBatch, tracking_id: str) -> list[OutboundRecord]:
        headers = [
            ("source", batch.source.encode()),
            ("tracking_id", tracking_id.encode()),
            ("schema_version", self._schema_version),
        ]
        encode = self._value_encoder.encode
        records = [
            OutboundRecord(record.record_id.encode(), encode(record), headers)
            for record in batch.accepted
        ]
        if batch.quality_flags:
            for position, record in enumerate(batch.accepted):
                flags = batch.quality_flags.get(id(record))
                if flags is not None:
                    plain = records[position]
                    records[position] = OutboundRecord(
                        key=plain.key,
                        value=plain.value,
                        headers=[*headers, (QUALITY_FLAGS_HEADER, flags)],
                    )
        return records


def dimension_error(count: int, dims: Collection[int]) -> str:
    """Why a record of ``count`` features is rejected when ``dims`` are allowed."""
    allowed = ", ".join(str(d) for d in sorted(dims))
    return f"features has {count} values; allowed dimensions are {allowed}"


# Larger than any record the schema takes, written without padding (4096 features of
# 25 characters, 32 metadata items of 64 + 1024 characters each escaped as \uXXXX:
# ~320 KB), so that the record-by-record path, which alone measures records, refuses
# none the other paths would take (a review: a setting as the bound made one record's
# fate depend on its neighbours).
MAX_BATCH_RECORD_BYTES = 1 << 20


class _SchemaFailed(Exception):
    """The fast path's typed decoding met a schema error (not a syntax error)."""


def record_error(
    index: int,
    exc: Exception,
    record_id: str | None = None,
    raw: bytes | msgspec.Raw | None = None,
    fmt: Format = Format.JSON,
) -> RecordError:
    """The one mapping from a record's decoding failure to its entry in ``errors``;
    ``record_id``: the id the record gave, if it gave a valid one (``given_record_id``).
    With the record's ``raw`` bytes, a metadata item msgspec locates only as
    ``metadata[...]`` is named by its key, as the finite-number check names it."""
    if isinstance(exc, msgspec.ValidationError):
        loc, msg = location(exc)
        named = loc == "metadata[...]" or loc == "metadata" and msg.startswith("a key:")
        if named and raw is not None and len(raw) <= KEY_NAMED_RECORD_BYTES:
            key = _metadata_key_at_fault(raw, fmt)
            if key is not None:
                loc = f"metadata[{bounded(repr(key), 80)}]"
        where = f" at {loc}" if loc else ""
        return RecordError(index=index, record_id=record_id, error=f"{msg.rstrip()}{where}")
    return RecordError(index=index, record_id=record_id, error=bounded(f"undecodable record: {exc}"))


# The largest rejected record whose metadata is decoded again to name the key at
# fault: a valid record's 32 items take ~35 KB; a hostile one of 100k keys costs a
# decode of them all each time, and is told ``metadata[...]`` alone.
KEY_NAMED_RECORD_BYTES = 64 * 1024


class _MetadataOnly(msgspec.Struct, frozen=True, gc=False):
    """Internal: a rejected record's metadata items, each value left as its bytes."""

    metadata: dict[str, msgspec.Raw] = {}


_metadata_decoders = _decoders(_MetadataOnly)
_metadata_value_decoders = _decoders(MetadataValue)


def _metadata_key_at_fault(raw: bytes | msgspec.Raw, fmt: Format) -> str | None:
    """The first metadata key of a rejected record that ``Record`` refuses, or whose
    value it refuses; None when none is found (keys that are not strings, a key given
    twice whose first value was the one refused)."""
    try:
        items: _MetadataOnly = _metadata_decoders[fmt].decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    decode_value = _metadata_value_decoders[fmt].decode
    for key, value in items.metadata.items():
        if not 0 < len(key) <= MAX_METADATA_KEY:
            return key
        try:
            decode_value(value)
        except (msgspec.DecodeError, RecursionError):
            return key
    return None


def given_record_id(raw: bytes | msgspec.Raw, fmt: Format) -> str | None:
    """The valid ``record_id`` of a record that is otherwise rejected (a bad timestamp,
    a field of the wrong type), so that its client can tell which record it was."""
    try:
        only: RecordIdOnly = _record_id_decoders[fmt].decode(raw)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        return None
    return only.record_id


# What ``RecordId``'s pattern allows, for a batch's ids joined: they are not empty
# (``UncheckedRecordId``), so each is visible ASCII exactly when all of them joined are.
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]*")
_RECORD_ID = operator.attrgetter("record_id")


def _ids_visible_ascii(records: Sequence[PackedRecord]) -> bool:
    """Whether every id the records give is what ``RecordId`` allows: one regex for the
    batch (0.05 µs a record) where ``PackedRecord`` leaves the pattern out. When one is
    not, the batch takes the per-record path, which rejects that record by name."""
    ids = "".join(filter(None, map(_RECORD_ID, records)))
    return _VISIBLE_ASCII.fullmatch(ids) is not None


def _flat_rows(parser: simdjson.Parser, joined: bytes, count: int) -> np.ndarray | None:
    """``joined``'s ``count`` arrays as rows of a matrix, if each is an array of numbers
    and all have one length. The parser's objects die here, so it can parse again
    (simdjson refuses to while any is alive)."""
    try:
        document = parser.parse(joined)
        if not isinstance(document, simdjson.Array):
            return None
        rows = iter(document)
        first = next(rows)
        dims = len(first) if isinstance(first, simdjson.Array) else 0
        if not 0 < dims <= MAX_FEATURES:
            return None
        for row in rows:
            if not isinstance(row, simdjson.Array) or len(row) != dims:
                return None
        values = document.as_buffer(of_type="d")
    except SIMDJSON_REFUSALS as exc:
        raise_parser_misuse(exc)
        return None
    return np.frombuffer(values, dtype=np.float64).reshape(count, dims)


def _feature_matrix(records: Sequence[PackedRecord]) -> tuple[np.ndarray, bool] | None:
    """The records' features as one matrix, row per record, when every record packs
    them alike: the same array header, then only float 64s or only float 32s (and
    which). None otherwise (ints among the values, another dimension, ...).

    float64 whatever was packed: a float32 widens to the same Python float the
    per-record path decodes it into, so both paths store the same numbers."""
    if not records:
        return None
    first = memoryview(records[0].features)
    size = len(first)
    if size >= 1 and 0x91 <= first[0] <= 0x9F:
        header, count = 1, first[0] & 0x0F
    elif size >= 3 and first[0] == 0xDC:
        header, count = 3, int.from_bytes(first[1:3], "big")
    else:
        return None
    if not 0 < count <= MAX_FEATURES or (size - header) % count:
        return None
    tagged = _TAGS.get((size - header) // count)
    features = [record.features for record in records]
    if tagged is None or set(map(len, features)) != {size}:
        return None
    tag, dtype = tagged
    raw = np.frombuffer(b"".join(features), dtype=np.uint8)
    rows = raw.reshape(len(records), size)
    if not (rows[:, :header] == rows[0, :header]).all():
        return None
    cells = rows[:, header:].view(dtype)  # each row's cells are contiguous: no copy
    if not (cells["tag"] == tag).all():
        return None
    matrix: np.ndarray = cells["value"].astype(np.float64)  # native, contiguous rows
    return matrix, tag == _FLOAT64_TAG


_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def _json_row(value: object) -> msgspec.Raw:
    """``enc_hook`` of the JSON value encoder: a feature row, formatted by orjson (the
    shortest repr of each float64; about half the cost of building the row's Python
    floats and formatting them) in exactly the bytes msgspec writes for those floats:
    orjson's exponents carry a ``+`` msgspec leaves out (checked on 2.5M values of
    every magnitude, stop 22). So a record's value is the same bytes whichever path
    decoded its batch. The features of a JSON record: the text they came as."""
    if isinstance(value, np.ndarray):
        text = orjson.dumps(value, option=_NUMPY)
        # Looked for with one byte's search (memchr): ``replace`` scans for its two
        # bytes a byte at a time, 2.1 µs a row where most rows hold no exponent.
        if text.find(b"+") >= 0:
            text = text.replace(b"e+", b"e")
        return msgspec.Raw(text)
    if isinstance(value, FeaturesPacked):  # never made for JSON values: for safety
        return _json_row(value.values)
    if isinstance(value, FeaturesText):
        return value.text
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


def _text_stands_for(text: bytes | msgspec.Raw, numbers: int) -> bool:
    """Whether the JSON text of an array of ``numbers`` numbers may stand for them in a
    JSON value: no longer than the numbers written plainly (``_plain_length``), each
    written with a point (``_all_points``)."""
    return _plain_length(len(text), numbers) and _all_points(text, numbers)


def _plain_length(length: int, numbers: int) -> bool:
    """An array's text of ``length`` bytes is no longer than its ``numbers`` numbers
    written plainly: one padded with blanks or with digits past a double's is
    formatted again (a review: one record's 1 MB of blanks went to Kafka as a 1 MB
    value)."""
    return length <= numbers * _PLAIN_NUMBER_BYTES + 2


def _all_points(text: bytes | msgspec.Raw, numbers: int) -> bool:
    """Every one of the ``numbers`` numbers of JSON ``text`` is written with a point (a
    number holds one at most). An integer literal (``3``, or ``2**70`` written out)
    would reach consumers that infer types as an integer where every other path
    writes a float (a review); a number written with only an exponent (``1e-05``) is
    formatted again too. Counted by numpy: ``bytes.count`` slows down where the byte
    is frequent, 3 µs a record of 128 numbers against 0.2-0.4."""
    return int(np.count_nonzero(np.frombuffer(text, np.uint8) == _POINT)) == numbers


_POINT = ord(".")
# A double's shortest repr takes at most 24 characters (``-2.2250738585072014e-308``),
# then a comma and a blank.
_PLAIN_NUMBER_BYTES = 26


def _too_many(sent: int, limit: int) -> ValidationFailed:
    return ValidationFailed(
        f"A batch holds at most {limit} records, got {sent}",
        errors=[FieldError(loc="records", msg=f"at most {limit} records")],
    )


def _not_a_batch(refusal: str) -> ValidationFailed:
    return ValidationFailed(
        f"A batch is an object of source and records, not {refusal}",
        errors=[FieldError(loc="body", msg=refusal)],
    )


def _records_sent(document: object) -> int | None:
    """How many records a JSON batch's ``records`` array holds (``json_outline``); 422
    for a batch object that cannot be outlined (``outline_refusal``)."""
    if not isinstance(document, simdjson.Object):
        return None
    refusal = outline_refusal(document)
    if refusal is not None:
        raise _not_a_batch(refusal)
    records = document.get("records")
    return len(records) if isinstance(records, simdjson.Array) else None


# A batch's members: source and records.
_BATCH_MEMBERS = 2


class _RecordsOnly(msgspec.Struct):
    """A batch's ``records`` as text; anything else skipped."""

    records: msgspec.Raw = msgspec.Raw()


_records_only = msgspec.json.Decoder(_RecordsOnly)


def _records_sent_in_bytes(body: bytes) -> int | None:
    """``_records_sent`` for a body simdjson refuses and msgspec takes (a number past
    64 bits), counted on its bytes (``top_level_length``); 422 for a batch object of
    more members than its two, as ``_records_sent`` refuses a key given twice (a
    review: there msgspec built the first of two ``records``, 5M of them)."""
    text = body.strip()
    members = top_level_length(text) if text[:1] == b"{" else 0
    if members > _BATCH_MEMBERS:
        raise _not_a_batch(f"an object of {members} members")
    try:
        records = bytes(_records_only.decode(body).records)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        return None
    return top_level_length(records) if records[:1] == b"[" else None


def _envelope(body: bytes, fmt: Format) -> IngestEnvelope | None:
    """A batch ``body`` with its records as bytes, as the record-by-record path reads
    it; None when it does not frame as a batch: the paths that decode it say why."""
    try:
        envelope: IngestEnvelope = _envelope_decoders[fmt].decode(body)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        return None
    return envelope


def _msgpack_row(value: object) -> list[float] | msgspec.Raw:
    """``enc_hook`` of the msgpack value encoder: a feature row as its numbers; the
    float 64s of a packed msgpack record, as the bytes they came as (the bytes msgspec
    writes for those numbers)."""
    if isinstance(value, FeaturesPacked):
        return value.text
    if isinstance(value, np.ndarray):
        row: list[float] = value.tolist()
        return row
    if isinstance(value, FeaturesText):  # JSON text: never made for msgpack values
        values = value.values
        return values.tolist() if isinstance(values, np.ndarray) else values
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


def _as_is(moment: datetime) -> datetime:
    return moment


_datetime_json = msgspec.json.Encoder()


def _rfc3339(moment: datetime) -> str:
    """A UTC datetime as RFC 3339 with a ``Z``: the text msgspec's JSON encoder writes
    for it, in C (0.1 µs against 0.8 for ``isoformat`` and a replace, per record)."""
    return _datetime_json.encode(moment)[1:-1].decode()
