"""A msgpack batch whose records all pack their features alike (float 64s or float
32s) is checked as one matrix, with the same answer, record by record, as the per-record
path: the same records accepted and stored, the same rejected with the same reasons."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import msgspec
import numpy as np
import pytest

from mlgate.config import load_settings
from mlgate.schemas.ingest import PackedRecord, Record
from mlgate.service.http.codec import Format
from mlgate.service.ingest import validation
from mlgate.service.ingest.batch import ValidatedBatch
from mlgate.service.ingest.validation import RecordValidator, _batch_decoders


@pytest.fixture(autouse=True)
def packed_for_any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """These bodies are a few records: let them take the packed path all the same."""
    monkeypatch.setattr(validation, "PACKED_FROM_BYTES", 0)


def _validator(**overrides: Any) -> RecordValidator:
    return RecordValidator(load_settings({}, feature_dims=(4,), **overrides))


def _body(*features: list[Any], single_float: bool = False) -> bytes:
    records = [
        {"record_id": f"r-{i}", "timestamp": "2026-11-01T10:00:00.123Z", "features": f,
         "label": 0.5, "metadata": {"device": "d-1", "fw": 3}}
        for i, f in enumerate(features)
    ]
    packed: bytes = msgpack.packb({"source": "s", "records": records}, use_single_float=single_float)
    return packed


def _per_record(validator: RecordValidator, body: bytes) -> ValidatedBatch:
    """What the per-record path (``IngestRequest`` with ``Record``s) answers."""
    request = _batch_decoders[Format.MSGPACK].decode(body)
    return validator.validate(request.source, list(request.records))


def _answer(batch: ValidatedBatch) -> tuple[list[Any], list[Any]]:
    return (
        [(r.record_id, r.timestamp, list(r.features), r.label, r.metadata) for r in batch.accepted],
        [(e.index, e.record_id, e.error) for e in batch.errors],
    )


def test_a_msgpack_batch_of_float64_features_decodes_packed() -> None:
    _, items = _validator().decode_batch(_body([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]), Format.MSGPACK)
    assert all(isinstance(item, PackedRecord) for item in items)


def test_a_small_msgpack_body_decodes_record_by_record(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validation, "PACKED_FROM_BYTES", 16 * 1024)
    _, items = _validator().decode_batch(_body([1.0, 2.0, 3.0, 4.0]), Format.MSGPACK)
    assert isinstance(items[0], Record)


def test_a_msgpack_batch_of_float32_features_decodes_packed() -> None:
    body = _body([1.5, 2.0, 3.0, 4.0], single_float=True)
    validator = _validator()
    source, items = validator.decode_batch(body, Format.MSGPACK)
    assert isinstance(items[0], PackedRecord)
    assert _answer(validator.validate(source, items)) == _answer(_per_record(validator, body))


@pytest.mark.parametrize("value_format", ["json", "msgpack"])
@pytest.mark.parametrize("single_float", [False, True])
def test_packed_records_are_stored_as_the_per_record_path_stores_them(
    value_format: str, single_float: bool
) -> None:
    """The Kafka values are the same bytes either way (a packed row is formatted by
    orjson, a list by msgspec, exponents and all)."""
    validator = _validator(value_format=value_format)
    rows = [
        [0.1, -2.5e-7, 1e20, 123456789.125], [1.0, -0.0, 3.4028234e38, 5e-324],
        [1e16, 1.2345678901234567e-30, -1.5e30, 2.0**64],
    ]
    body = _body(*rows, single_float=single_float)
    source, items = validator.decode_batch(body, Format.MSGPACK)
    assert isinstance(items[0], PackedRecord)
    packed = validator.outbound(validator.validate(source, items), "t")
    plain = validator.outbound(_per_record(validator, body), "t")
    assert [(r.key, r.value) for r in packed] == [(r.key, r.value) for r in plain]


def test_a_bad_label_elsewhere_in_a_large_batch_leaves_the_other_values_bytes_as_they_were() -> None:
    """Such a batch is decoded record by record (``FiniteFloat``), its good records
    stored in the same bytes as in a batch of only good ones."""
    validator = _validator()
    rows = [[1e20, 1e16, -2.5e-7, 0.1]] * 3
    good = _body(*rows)
    records = msgpack.unpackb(good)
    records["records"][1]["label"] = math.nan
    mixed = msgpack.packb(records)
    stored = []
    for body in (good, mixed):
        source, items = validator.decode_batch(body, Format.MSGPACK)
        stored.append({r.key: r.value for r in validator.outbound(validator.validate(source, items), "t")})
    assert isinstance(validator.decode_batch(mixed, Format.MSGPACK)[1][0], Record)  # record by record
    assert stored[1] == {key: value for key, value in stored[0].items() if key != b"r-1"}


def test_features_with_an_int_among_the_floats_take_the_per_record_path() -> None:
    _, items = _validator().decode_batch(_body([1, 2.0, 3.0, 4.0]), Format.MSGPACK)
    assert isinstance(items[0], Record)


@pytest.mark.parametrize(
    ("overrides", "rows"),
    [
        ({}, [[1.0, math.nan, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [math.inf, 0.0, 0.0, -math.inf]]),
        ({"feature_min": -1.0, "feature_max": 10.0}, [[0.0, 1.0, 2.0, 3.0], [-2.0, 0.0, 0.0, 0.0], [0.0, 11.0, 0.0, 0.0]]),
        ({}, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),  # a dimension not allowed: every record
        ({}, [[1e308, 1e308, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]]),  # finite values whose sum overflows
    ],
)
def test_packed_checks_answer_what_the_per_record_checks_answer(
    overrides: dict[str, Any], rows: list[list[float]]
) -> None:
    validator = _validator(**overrides)
    body = _body(*rows)
    source, items = validator.decode_batch(body, Format.MSGPACK)
    assert isinstance(items[0], PackedRecord)
    assert _answer(validator.validate(source, items)) == _answer(_per_record(validator, body))


def test_a_packed_record_with_a_bad_label_is_rejected_with_its_index() -> None:
    validator = _validator()
    records = [
        {"record_id": "r-0", "features": [1.0, 2.0, 3.0, 4.0], "label": 1.0},
        {"record_id": "r-1", "features": [1.0, 2.0, 3.0, 4.0], "label": math.nan},
    ]
    source, items = validator.decode_batch(msgpack.packb({"source": "s", "records": records}), Format.MSGPACK)
    batch = validator.validate(source, items)
    assert [(e.index, e.error) for e in batch.errors] == [(1, "label is not a finite number")]
    assert [r.record_id for r in batch.accepted] == ["r-0"]


def test_a_packed_batchs_msgpack_values_carry_its_float64s_as_they_were_sent() -> None:
    """No float is decoded or encoded again: the bytes are those msgspec would write."""
    validator = _validator(value_format="msgpack")
    body = _body([1.5, 2.0, 3.0, 4.0], [0.1, 0.2, 0.3, 0.4])
    source, items = validator.decode_batch(body, Format.MSGPACK)
    values = [r.value for r in validator.outbound(validator.validate(source, items), "t")]
    for value, item in zip(values, items, strict=True):
        assert bytes(item.features) in value
        assert msgspec.msgpack.decode(value)["features"] == msgpack.unpackb(bytes(item.features))


@pytest.mark.parametrize("packed", [True, False])
def test_msgpack_values_write_float32_features_as_float64s_whatever_the_batch_size(
    monkeypatch: pytest.MonkeyPatch, packed: bool
) -> None:
    """One topic, one number type: a small batch (decoded record by record) and a
    large one (read as a matrix) write a client's float 32s alike."""
    if not packed:
        monkeypatch.setattr(validation, "PACKED_FROM_BYTES", 1 << 30)
    validator = _validator(value_format="msgpack")
    body = _body([1.5, 2.0, 3.0, 0.1], single_float=True)
    source, items = validator.decode_batch(body, Format.MSGPACK)
    assert isinstance(items[0], PackedRecord) == packed
    [out] = validator.outbound(validator.validate(source, items), "t")
    features = msgspec.msgpack.decode(out.value, type=dict[str, msgspec.Raw])["features"]
    assert bytes(features) == msgspec.msgpack.encode([1.5, 2.0, 3.0, float(np.float32(0.1))])


@pytest.mark.parametrize(
    "stamp",
    [0, 1_700_000_000.25, "2024-03-01T12:00:00+02:00", "2024-03-01T12:00:00.123456Z", "0001-01-01T00:00:00Z"],
)
def test_msgpack_values_write_a_timestamp_as_json_values_do(stamp: Any) -> None:
    """RFC 3339 UTC text with a ``Z`` either way (JSON writes the datetime itself)."""
    record = {"record_id": "r-0", "timestamp": stamp, "features": [1.0, 2.0, 3.0, 4.0]}
    body = msgpack.packb({"source": "s", "records": [record]})
    stored = {}
    for value_format, decode in (("json", msgspec.json.decode), ("msgpack", msgspec.msgpack.decode)):
        validator = _validator(value_format=value_format)
        source, items = validator.decode_batch(body, Format.MSGPACK)
        [out] = validator.outbound(validator.validate(source, items), "t")
        stored[value_format] = decode(out.value)["timestamp"]
    assert stored["msgpack"] == stored["json"]
    assert stored["msgpack"].endswith("Z")


@pytest.mark.parametrize("format_", [Format.MSGPACK, Format.JSON])
@pytest.mark.parametrize("bad_id", ["has space", "tab\there", "naïve", "line\n"])
def test_a_record_id_that_is_not_visible_ascii_is_rejected_by_name_in_a_packed_batch(
    format_: Format, bad_id: str
) -> None:
    """The packed path checks the batch's ids in one regex: a bad one sends the batch
    down the per-record path, which rejects that record alone, as it always has."""
    validator = _validator()
    records = [
        {"record_id": record_id, "features": [1.0, 2.0, 3.0, 4.0]}
        for record_id in ("r-0", bad_id, "r-2")
    ]
    envelope = {"source": "s", "records": records}
    body = msgpack.packb(envelope) if format_ is Format.MSGPACK else msgspec.json.encode(envelope)
    source, items = validator.decode_batch(body, format_)
    batch = validator.validate(source, items)
    assert [r.record_id for r in batch.accepted] == ["r-0", "r-2"]
    [error] = batch.errors
    assert (error.index, error.record_id) == (1, None)
    assert "record_id" in error.error


def test_a_packed_batch_of_visible_ascii_ids_keeps_the_packed_path() -> None:
    records = [{"record_id": "!~az-09_{}", "features": [1.0, 2.0, 3.0, 4.0]}]
    _, items = _validator().decode_batch(msgpack.packb({"source": "s", "records": records}), Format.MSGPACK)
    assert isinstance(items[0], PackedRecord)


def test_a_packed_record_with_a_non_finite_metadata_float_is_rejected_with_its_index() -> None:
    validator = _validator()
    records = [
        {"record_id": f"r-{i}", "features": [1.0, 2.0, 3.0, 4.0], "metadata": {"gain": gain}}
        for i, gain in enumerate([0.5, math.inf, -1.0])
    ]
    source, items = validator.decode_batch(msgpack.packb({"source": "s", "records": records}), Format.MSGPACK)
    batch = validator.validate(source, items)
    assert [(e.index, e.error) for e in batch.errors] == [(1, "metadata['gain'] is not a finite number")]
    assert [r.record_id for r in batch.accepted] == ["r-0", "r-2"]


def test_packed_labels_whose_sum_overflows_are_all_accepted() -> None:
    validator = _validator()
    records = [
        {"record_id": f"r-{i}", "features": [1.0, 2.0, 3.0, 4.0], "label": 1e308, "metadata": {"g": 1e308}}
        for i in range(3)
    ]
    source, items = validator.decode_batch(msgpack.packb({"source": "s", "records": records}), Format.MSGPACK)
    batch = validator.validate(source, items)
    assert batch.errors == [] and len(batch.accepted) == 3


def test_a_packed_batchs_json_values_carry_each_row_as_msgspec_writes_it() -> None:
    """Each value holds its own row's text: the shortest repr of each float64, with
    exponents as msgspec writes them (no ``+``), though orjson formats the row."""
    validator = _validator()
    rows = [[0.1, -2.5e-7, 1e20, 123456789.125], [1.0, -0.0, 3.4028234e38, 5e-324], [7.0, 8.0, 9.0, 1e-5]]
    source, items = validator.decode_batch(_body(*rows), Format.MSGPACK)
    batch = validator.validate(source, items)
    values = [r.value for r in validator.outbound(batch, "t")]
    for value, row in zip(values, rows, strict=True):
        assert b'"features":' + msgspec.json.encode(row) + b"," in value
