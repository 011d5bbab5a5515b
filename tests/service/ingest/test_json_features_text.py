"""A JSON batch's features reach a JSON Kafka value as the text they were sent as (the
same numbers, not formatted again); anything that does not decode takes the general
path, with the same answer as ever."""

from __future__ import annotations

from typing import Any

import msgspec

from mlgate.config import load_settings
from mlgate.schemas.ingest import TextRecord
from mlgate.service.http.codec import Format
from mlgate.service.ingest.validation import RecordValidator


def _validator(**overrides: Any) -> RecordValidator:
    return RecordValidator(load_settings({}, feature_dims=(4,), **overrides))


def _body(*features: str) -> bytes:
    records = ",".join(
        f'{{"record_id": "r-{i}", "timestamp": "2026-11-01T10:00:00.123Z", "features": {f}, "label": 1}}'
        for i, f in enumerate(features)
    )
    return f'{{"source": "s", "records": [{records}]}}'.encode()


def _values(validator: RecordValidator, body: bytes) -> list[bytes]:
    source, items = validator.decode_batch(body, Format.JSON)
    return [record.value for record in validator.outbound(validator.validate(source, items), "t")]


def test_a_json_records_features_are_stored_as_the_text_they_came_as() -> None:
    [value] = _values(_validator(), _body("[0.1, -2.5e-7, 3,  4.50]"))
    assert b'"features":[0.1, -2.5e-7, 3,  4.50],' in value
    assert msgspec.json.decode(value)["features"] == [0.1, -2.5e-7, 3.0, 4.5]


def test_the_stored_record_is_the_same_document_as_without_the_text() -> None:
    validator = _validator()
    body = _body("[0.1, 0.2, 0.3, 0.4]", "[1e3, 2E-3, -0.0, 5]")
    source, items = validator.decode_batch(body, Format.JSON)
    assert all(isinstance(item, TextRecord) for item in items)
    plain = [msgspec.json.decode(v) for v in _values(validator, body)]
    rebuilt = [
        msgspec.json.decode(msgspec.json.encode(msgspec.structs.asdict(r)))
        for r in validator.validate(source, list(_general(body)))
        .accepted
    ]
    assert plain == rebuilt


def _general(body: bytes) -> list[Any]:
    from mlgate.service.ingest.validation import _batch_decoders

    return list(_batch_decoders[Format.JSON].decode(body).records)


def test_a_msgpack_value_format_stores_the_numbers() -> None:
    [value] = _values(_validator(value_format="msgpack"), _body("[1, 2.5, 3, 4]"))
    assert msgspec.msgpack.decode(value)["features"] == [1.0, 2.5, 3.0, 4.0]


def test_a_record_whose_features_do_not_decode_is_rejected_alone_as_before() -> None:
    validator = _validator()
    source, items = validator.decode_batch(_body("[1, 2, 3, 4]", '[1, "x", 3, 4]'), Format.JSON)
    batch = validator.validate(source, items)
    assert [r.record_id for r in batch.accepted] == ["r-0"]
    [error] = batch.errors
    assert error.index == 1 and "features[1]" in error.error


def test_checks_read_the_numbers_of_a_text_record() -> None:
    validator = _validator(feature_max=10.0)
    source, items = validator.decode_batch(_body("[1, 2, 3, 4]", "[1, 2, 3, 40]", "[1, 2, 3]"), Format.JSON)
    batch = validator.validate(source, items)
    assert [r.record_id for r in batch.accepted] == ["r-0"]
    assert [(e.index, e.error) for e in batch.errors] == [
        (1, "features has a value above the allowed maximum 10.0"),
        (2, "features has 3 values; allowed dimensions are 4"),
    ]
