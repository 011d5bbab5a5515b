"""RecordValidator: per-record validation of an ingest batch, with partial success.

A batch is decoded in one pass when every record is well-formed (the fast path);
otherwise each record is decoded on its own so a malformed one costs only itself.
Then the checks that depend on settings run: allowed feature dimensions, finite
values, the configured value range. Accepted records come out encoded for the sink.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from config import Settings
from schemas.ingest import (
    IngestEnvelope,
    IngestRequest,
    Record,
    RecordError,
    StoredRecord,
)
from schemas.problem import FieldError
from service.codec import Format, decode, location
from service.errors import ValidationFailed
from workers.records import OutboundRecord

_record_decoders: dict[Format, Any] = {
    Format.JSON: msgspec.json.Decoder(Record),
    Format.MSGPACK: msgspec.msgpack.Decoder(Record),
}


@dataclass(slots=True)
class ValidatedBatch:
    source: str
    accepted: list[StoredRecord]
    errors: list[RecordError]

    @property
    def size(self) -> int:
        return len(self.accepted) + len(self.errors)


class RecordValidator:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._dims = frozenset(settings.feature_dims)
        self._min = settings.feature_min
        self._max = settings.feature_max
        self._value_encoder: msgspec.json.Encoder | msgspec.msgpack.Encoder = (
            msgspec.msgpack.Encoder()
            if settings.value_format == "msgpack"
            else msgspec.json.Encoder()
        )
        self._schema_version = settings.schema_version.encode()

    # -- decoding ---------------------------------------------------------------------

    def decode_batch(self, body: bytes, fmt: Format) -> tuple[str, list[Record | RecordError]]:
        """The source and, per index, a decoded record or the reason it was rejected."""
        try:
            batch = decode(body, IngestRequest, fmt)
            items: list[Record | RecordError] = list(batch.records)
            source = batch.source
        except ValidationFailed:
            envelope = decode(body, IngestEnvelope, fmt)
            source = envelope.source
            items = [self._decode_one(i, raw, fmt) for i, raw in enumerate(envelope.records)]
        limit = self._settings.max_batch_records
        if len(items) > limit:
            raise ValidationFailed(
                f"A batch holds at most {limit} records, got {len(items)}",
                errors=[FieldError(loc="records", msg=f"at most {limit} records")],
            )
        return source, items

    @staticmethod
    def _decode_one(index: int, raw: msgspec.Raw, fmt: Format) -> Record | RecordError:
        try:
            record: Record = _record_decoders[fmt].decode(raw)
            return record
        except msgspec.ValidationError as exc:
            loc, msg = location(exc)
            where = f" at {loc}" if loc else ""
            return RecordError(index=index, record_id=None, error=f"{msg}{where}")
        except (msgspec.DecodeError, RecursionError) as exc:
            return RecordError(index=index, record_id=None, error=f"undecodable record: {exc}")

    # -- semantic checks --------------------------------------------------------------

    def validate(self, source: str, items: list[Record | RecordError]) -> ValidatedBatch:
        accepted: list[StoredRecord] = []
        errors: list[RecordError] = []
        for index, item in enumerate(items):
            if isinstance(item, RecordError):
                errors.append(item)
                continue
            problem = self._check(item)
            if problem is not None:
                errors.append(RecordError(index=index, record_id=item.record_id, error=problem))
                continue
            accepted.append(self._stored(source, item))
        return ValidatedBatch(source=source, accepted=accepted, errors=errors)

    def _check(self, record: Record) -> str | None:
        features = record.features
        if len(features) not in self._dims:
            allowed = ", ".join(str(d) for d in sorted(self._dims))
            return f"features has {len(features)} values; allowed dimensions are {allowed}"
        # One sum is finite exactly when every value is, unless finite values overflow:
        # only then is the slow per-value scan needed.
        if not math.isfinite(sum(features)) and not all(map(math.isfinite, features)):
            bad = next(i for i, v in enumerate(features) if not math.isfinite(v))
            return f"features[{bad}] is not a finite number"
        if record.label is not None and not math.isfinite(record.label):
            return "label is not a finite number"
        if self._min is not None and min(features) < self._min:
            return f"features has a value below the allowed minimum {self._min}"
        if self._max is not None and max(features) > self._max:
            return f"features has a value above the allowed maximum {self._max}"
        return None

    @staticmethod
    def _stored(source: str, record: Record) -> StoredRecord:
        stamp = record.timestamp
        if stamp is None:
            moment = datetime.now(UTC)
        elif isinstance(stamp, datetime):
            moment = stamp.astimezone(UTC)
        else:
            moment = datetime.fromtimestamp(stamp, UTC)
        return StoredRecord(
            record_id=record.record_id or uuid.uuid4().hex,
            timestamp=moment.isoformat().replace("+00:00", "Z"),
            features=record.features,
            label=record.label,
            metadata=record.metadata,
            source=source,
        )

    # -- encoding for the sink --------------------------------------------------------

    def outbound(self, batch: ValidatedBatch, tracking_id: str) -> list[OutboundRecord]:
        headers = [
            ("source", batch.source.encode()),
            ("tracking_id", tracking_id.encode()),
            ("schema_version", self._schema_version),
        ]
        encode = self._value_encoder.encode
        return [
            OutboundRecord(key=record.record_id.encode(), value=encode(record), headers=headers)
            for record in batch.accepted
        ]
