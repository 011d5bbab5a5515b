"""RecordValidator: per-record validation of an ingest batch, with partial success.

A batch is decoded in one pass when every record is well-formed (the fast path);
otherwise each record is decoded on its own so a malformed one costs only itself.
Then the checks that depend on settings run: allowed feature dimensions, finite
values, the configured value range; then, when the validator was given a
``QualityScreen``, the source's feature profile (service.quality_screen). Accepted
records come out encoded for the sink, flagged ones with a ``quality_flags`` header.
"""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec

from mlgate.config import Settings
from mlgate.schemas.ingest import (
    IngestEnvelope,
    IngestRequest,
    Record,
    RecordError,
    StoredRecord,
)
from mlgate.schemas.problem import FieldError
from mlgate.service.http.codec import Format, decode, location, undecodable
from mlgate.service.http.errors import ValidationFailed
from mlgate.service.ingest.batch import ValidatedBatch
from mlgate.service.ingest.quality_screen import QUALITY_FLAGS_HEADER, QualityScreen
from mlgate.workers.sinks.records import OutboundRecord

_batch_decoders: dict[Format, Any] = {
    Format.JSON: msgspec.json.Decoder(IngestRequest),
    Format.MSGPACK: msgspec.msgpack.Decoder(IngestRequest),
}
_record_decoders: dict[Format, Any] = {
    Format.JSON: msgspec.json.Decoder(Record),
    Format.MSGPACK: msgspec.msgpack.Decoder(Record),
}


class RecordValidator:
    def __init__(self, settings: Settings, quality: QualityScreen | None = None) -> None:
        self._settings = settings
        self._quality = quality
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
        """The source and, per index, a decoded record or the reason it was rejected.

        Bytes that are not JSON / msgpack at all are 400 even when msgspec meets a
        schema error first: the envelope decoding (``codec.decode``) tells them apart."""
        try:
            batch: IngestRequest = _batch_decoders[fmt].decode(body)
            items: list[Record | RecordError] = list(batch.records)
            source = batch.source
        except msgspec.ValidationError:
            envelope = decode(body, IngestEnvelope, fmt)
            source = envelope.source
            items = [self._decode_one(i, raw, fmt) for i, raw in enumerate(envelope.records)]
        except (msgspec.DecodeError, RecursionError) as exc:
            raise undecodable(exc, fmt) from None
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
        except (msgspec.DecodeError, RecursionError) as exc:
            return record_error(index, exc)

    # -- semantic checks --------------------------------------------------------------

    def validate(self, source: str, items: list[Record | RecordError]) -> ValidatedBatch:
        accepted: list[StoredRecord] = []
        errors: list[RecordError] = []
        # Records without a timestamp get the batch's arrival time (one clock read, one
        # isoformat per batch rather than per record).
        received = _rfc3339(datetime.now(UTC))
        for index, item in enumerate(items):
            if isinstance(item, RecordError):
                # Indexes are positions in ``items``; the stream route offsets them.
                errors.append(item if item.index == index else msgspec.structs.replace(item, index=index))
                continue
            problem = self._check(item)
            if problem is not None:
                errors.append(RecordError(index=index, record_id=item.record_id, error=problem))
                continue
            accepted.append(self._stored(source, item, received))
        batch = ValidatedBatch(source=source, accepted=accepted, errors=errors)
        return batch if self._quality is None else self._quality.screen(batch)

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
        for key, value in record.metadata.items():
            if isinstance(value, float) and not math.isfinite(value):
                # JSON has no NaN/inf: stored, it would silently turn into null.
                return f"metadata[{key!r}] is not a finite number"
        if self._min is not None and min(features) < self._min:
            return f"features has a value below the allowed minimum {self._min}"
        if self._max is not None and max(features) > self._max:
            return f"features has a value above the allowed maximum {self._max}"
        return None

    @staticmethod
    def _stored(source: str, record: Record, received: str) -> StoredRecord:
        stamp = record.timestamp
        if stamp is None:
            timestamp = received
        elif isinstance(stamp, datetime):
            timestamp = _rfc3339(stamp.astimezone(UTC))
        else:
            timestamp = _rfc3339(datetime.fromtimestamp(stamp, UTC))
        return StoredRecord(
            record_id=record.record_id or uuid.uuid4().hex,
            timestamp=timestamp,
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
        records = [
            OutboundRecord(key=record.record_id.encode(), value=encode(record), headers=headers)
            for record in batch.accepted
        ]
        if batch.quality_flags:
            for position, record in enumerate(batch.accepted):
                flags = batch.quality_flags.get(record.record_id)
                if flags is not None:
                    plain = records[position]
                    records[position] = OutboundRecord(
                        key=plain.key, value=plain.value, headers=[*headers, (QUALITY_FLAGS_HEADER, flags)]
                    )
        return records


def record_error(index: int, exc: Exception) -> RecordError:
    """The one mapping from a record's decoding failure to its entry in ``errors``."""
    if isinstance(exc, msgspec.ValidationError):
        loc, msg = location(exc)
        where = f" at {loc}" if loc else ""
        return RecordError(index=index, record_id=None, error=f"{msg}{where}")
    return RecordError(index=index, record_id=None, error=f"undecodable record: {exc}")


def _rfc3339(moment: datetime) -> str:
    """A UTC datetime as RFC 3339 with a ``Z``."""
    return moment.isoformat().replace("+00:00", "Z")
