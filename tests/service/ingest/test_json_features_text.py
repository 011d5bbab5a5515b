"""A JSON batch's features reach a JSON Kafka value as the text they were sent as (the
same numbers, not formatted again) when each is written with a point, else formatted
as floats as every other path writes them; anything that does not decode takes the general
path, with the same answer as ever."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from mlgate.config import load_settings
from mlgate.schemas.ingest import TextRecord
from mlgate.service.http.codec import Format
from mlgate.service.ingest import validation
from mlgate.service.ingest.validation import PACKED_FROM_BYTES, PackedRecords, RecordValidator


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
    [value] = _values(_validator(), _body("[0.1, -2.5e-7, 3.0,  4.50]"))
    assert b'"features":[0.1, -2.5e-7, 3.0,  4.50],' in value
    assert msgspec.json.decode(value)["features"] == [0.1, -2.5e-7, 3.0, 4.5]


@pytest.mark.parametrize("large", [False, True], ids=["per-record", "matrix"])
def test_integer_literals_in_features_are_stored_as_floats(large: bool) -> None:
    """As every other path writes them: a consumer inferring types from the JSON must
    not see integers in one record's features and floats in another's (a review)."""
    rows = ["[1, 2.5, 1180591620717411303424, -4]"] * (PACKED_FROM_BYTES // 40 if large else 1)
    values = _values(_validator(), _body(*rows))
    assert b'"features":[1.0,2.5,1.1805916207174113e21,-4.0],' in values[0]
    assert all(value.count(b'"features":[1.0,2.5,') == 1 for value in values)


def test_one_record_with_an_integer_literal_has_a_large_batch_written_as_floats() -> None:
    body = _large_body(["[0.5, 1.5, 2.5, 3]"])
    values = _values(_validator(), body)
    assert b'"features":[0.5,1.5,2.5,3.0],' in values[0]
    assert b'"features":[0.5,1.5,2.5,3.5],' in values[1]  # formatted as floats too
    assert _answer(_validator(), body) == _as_before(body)


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


def _large_body(features: list[str], filler: str = "[0.5, 1.5, 2.5, 3.5]", size: int = 200) -> bytes:
    """A batch past ``PACKED_FROM_BYTES``: ``features`` first, then filler records."""
    return _body(*features, *[filler] * (size - len(features)))


def _decoded(validator: RecordValidator, body: bytes) -> tuple[str, Any]:
    assert len(body) >= PACKED_FROM_BYTES
    return validator.decode_batch(body, Format.JSON)


def _answer(validator: RecordValidator, body: bytes) -> tuple[list[Any], list[tuple[int, str]]]:
    """What a batch stores and rejects: the stored documents, the (index, error)s."""
    source, items = validator.decode_batch(body, Format.JSON)
    batch = validator.validate(source, items)
    stored = [msgspec.json.decode(r.value) for r in validator.outbound(batch, "t")]
    return stored, [(e.index, e.error) for e in batch.errors]


def _as_before(body: bytes) -> tuple[list[Any], list[tuple[int, str]]]:
    """The same batch through the record-by-record path (a body too small for the
    matrix would take it; here it is forced)."""
    validator = _validator()
    validator._json_feature_matrix = lambda records: None  # type: ignore[method-assign]
    return _answer(validator, body)


def test_a_large_json_batch_parses_its_features_into_one_matrix() -> None:
    source, items = _decoded(_validator(), _large_body(["[1.0, 2.5, -0.0, 0.4e-2]"]))
    assert isinstance(items, PackedRecords) and items.texts
    assert items.matrix.shape == (200, 4)
    assert items.matrix[0].tolist() == [1.0, 2.5, -0.0, 0.004]


def test_the_matrix_path_stores_the_text_and_answers_as_the_record_path() -> None:
    body = _large_body(["[0.1, -2.5e-7, 3.0,  4.50]", "[1.0e3, 2.0E-3, 9007199254740993.0, 5.0]"])
    stored, errors = _answer(_validator(), body)
    assert (stored, errors) == _as_before(body)
    [value, *_] = _values(_validator(), body)
    assert b'"features":[0.1, -2.5e-7, 3.0,  4.50],' in value


def test_the_parser_parses_batch_after_batch() -> None:
    validator = _validator()
    for _ in range(3):
        _, items = _decoded(validator, _large_body(["[1, 2, 3, 4]"]))
        assert isinstance(items, PackedRecords)


@pytest.mark.parametrize(
    "features",
    [
        ["[[], 1, 2, 3]", "[[1, 2], 3, 4, 5]"],  # nested: counts that make up for each other
        ["5", "[[1, 2, 3, 4]]"],  # a number, and an array of one array
        ['[1, "x", 3, 4]'],
        ['[1, "[", 3, 4]'],
        ["[1, null, 3, 4]", "[true, 2, 3, 4]"],
        ["[1e400, 2, 3, 4]"],  # msgspec makes it infinite: not a finite number
        ["[]"],
        ["[1, 2, 3]", "[1, 2, 3, 4, 5]"],  # other lengths
        ['{"a": 1}'],
        ["[100000000000000000000000000, 2, 3, 4]"],  # past 64-bit ints
        ["[-9223372036854775809, 2, 3, 4]"],  # below -2**63: simdjson's BIGINT_ERROR
    ],
)
def test_features_the_matrix_cannot_take_are_answered_as_the_record_path_answers(
    features: list[str],
) -> None:
    body = _large_body(features)
    source, items = _decoded(_validator(), body)
    assert not isinstance(items, PackedRecords)
    assert _answer(_validator(), body) == _as_before(body)


def test_a_batch_of_one_unusual_width_is_a_matrix_whose_rows_are_rejected_by_the_check() -> None:
    body = _large_body([], filler="[1, 2, 3]")
    source, items = _decoded(_validator(), body)
    assert isinstance(items, PackedRecords)
    stored, errors = _answer(_validator(), body)
    assert stored == [] and errors[0] == (0, "features has 3 values; allowed dimensions are 4")
    assert (stored, errors) == _as_before(body)


def test_range_checks_read_the_matrix() -> None:
    validator = _validator(feature_max=10.0, feature_min=-1.0)
    stored, errors = _answer(validator, _large_body(["[1, 2, 3, 40]", "[-5, 2, 3, 4]"]))
    assert errors == [
        (0, "features has a value above the allowed maximum 10.0"),
        (1, "features has a value below the allowed minimum -1.0"),
    ]
    assert len(stored) == 198


def test_features_past_what_the_validators_parser_keeps_get_a_parser_of_their_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(validation, "PARSER_KEEPS_BYTES", 1000)
    validator = _validator()  # its own parser can never grow past 1000 bytes
    _, items = _decoded(validator, _large_body(["[1, 2, 3, 4]"]))
    assert isinstance(items, PackedRecords) and items.matrix.shape == (200, 4)


def test_an_int_below_64_bits_in_a_batch_past_what_the_parser_keeps_is_no_500(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """simdjson refuses it with a RuntimeError; msgspec takes it as a float."""
    monkeypatch.setattr(validation, "PARSER_KEEPS_BYTES", 1000)  # a parser of its own
    body = _large_body(["[-9223372036854775809, 2, 3, 4]"])
    stored, errors = _answer(_validator(), body)
    assert (stored, errors) == _as_before(body)
    assert errors == [] and stored[0]["features"] == [float(-9223372036854775809), 2.0, 3.0, 4.0]


def test_a_parser_still_referenced_is_replaced_and_the_batch_decoded_record_by_record() -> None:
    validator = _validator()
    held = validator._json_parser.parse(b"[1]")  # simdjson refuses to parse again meanwhile
    _, items = _decoded(validator, _large_body(["[1, 2, 3, 4]"]))
    assert not isinstance(items, PackedRecords) and len(items) == 200
    _, items = _decoded(validator, _large_body(["[1, 2, 3, 4]"]))  # with a new parser
    assert isinstance(items, PackedRecords)
    assert held is not None
