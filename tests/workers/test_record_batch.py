"""The Kafka writer's record batches read back, with aiokafka's own reader (the C one a
consumer uses), as the records appended: checksum, keys, values, headers, offsets,
timestamps; and they fill up as aiokafka's builder does."""

from __future__ import annotations

import time

import pytest
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch

from mlgate.workers.sinks import record_batch
from mlgate.workers.sinks.record_batch import RecordBatchBuilder
from mlgate.workers.sinks.records import OutboundRecord

HEADERS = [("source", b"sensors"), ("tracking_id", b"t-1"), ("schema_version", b"1")]


def _read(builder: RecordBatchBuilder) -> DefaultRecordBatch:
    return DefaultRecordBatch(bytearray(builder._build()))


def test_a_batch_reads_back_as_the_records_appended() -> None:
    """Values of every length up to 20 KB: varints of one to three bytes, in and past
    the builder's table."""
    builder = RecordBatchBuilder(8 << 20)
    flagged = [*HEADERS, ("quality_flags", b"drift")]
    records = [
        (f"r-{i}".encode(), b"v" * (i * 997 % 20_000), flagged if i == 7 else HEADERS)
        for i in range(300)
    ]
    before = int(time.time() * 1000)
    for key, value, headers in records:
        assert builder.append(timestamp=None, key=key, value=value, headers=headers)
    batch = _read(builder)
    assert batch.validate_crc()
    assert batch.magic == 2 and batch.compression_type == 0
    read = list(batch)
    assert [(r.offset, r.key, r.value, list(r.headers)) for r in read] == [
        (i, key, value, headers) for i, (key, value, headers) in enumerate(records)
    ]
    assert all(before <= r.timestamp <= int(time.time() * 1000) for r in read)


def test_null_keys_values_and_header_values_read_back_as_null() -> None:
    builder = RecordBatchBuilder(1 << 20)
    builder.append(timestamp=None, key=None, value=None, headers=[("h", None)])
    [record] = list(_read(builder))
    assert (record.key, record.value, list(record.headers)) == (None, None, [("h", None)])


def test_a_full_batch_refuses_the_next_record_where_aiokafkas_does() -> None:
    ours, theirs = RecordBatchBuilder(16_384), BatchBuilder(16_384, 0)
    accepted = {"ours": 0, "theirs": 0}
    for i in range(100):
        key, value = f"r-{i:05d}".encode(), b"x" * 900
        if ours.append(timestamp=None, key=key, value=value, headers=HEADERS):
            accepted["ours"] += 1
        if theirs.append(timestamp=None, key=key, value=value, headers=HEADERS) is not None:
            accepted["theirs"] += 1
    assert accepted["ours"] == accepted["theirs"] == ours.record_count()
    assert ours.closed() and ours.size() == len(ours._build())


def test_a_record_larger_than_the_batch_makes_a_batch_of_its_own() -> None:
    builder = RecordBatchBuilder(1024)
    assert builder.append(timestamp=None, key=b"k", value=b"x" * 5000, headers=[])
    assert builder.append(timestamp=None, key=b"k2", value=b"y", headers=[]) is None
    assert [r.value for r in _read(builder)] == [b"x" * 5000]


def test_the_producer_state_is_written_into_the_batch() -> None:
    builder = RecordBatchBuilder(1 << 20)
    builder.append(timestamp=None, key=b"k", value=b"v", headers=[])
    builder._set_producer_state(42, 3, 17)
    batch = _read(builder)
    assert (batch.producer_id, batch.producer_epoch, batch.base_sequence) == (42, 3, 17)
    assert batch.validate_crc()


def test_building_twice_gives_the_same_bytes() -> None:
    """A retried send sends the batch again."""
    builder = RecordBatchBuilder(1 << 20)
    builder.append(timestamp=None, key=b"k", value=b"v", headers=HEADERS)
    assert builder._build() is builder._build()
    assert builder.append(timestamp=None, key=b"k2", value=b"v", headers=HEADERS) is None


def test_a_batch_is_byte_for_byte_aiokafkas_for_the_same_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    now_ms = 1_764_000_000_123
    monkeypatch.setattr(record_batch.time, "time", lambda: now_ms / 1000)
    ours, theirs = RecordBatchBuilder(1 << 20), BatchBuilder(1 << 20, 0)
    for i in range(200):
        key, value = f"r-{i}".encode(), b"v" * (i * 131 % 9000)
        headers = HEADERS if i % 5 else [("h", None)]
        assert ours.append(timestamp=None, key=key, value=value, headers=headers)
        assert theirs.append(timestamp=now_ms, key=key, value=value, headers=headers) is not None
    assert bytes(ours._build()) == bytes(theirs._build())


def test_a_value_that_is_not_bytes_is_refused_at_append_as_by_aiokafka() -> None:
    """Not in the producer's sender, where it would stop every batch's delivery."""
    builder = RecordBatchBuilder(1 << 20)
    with pytest.raises(TypeError):
        builder.append(timestamp=None, key=b"k", value="text", headers=[])  # type: ignore[arg-type]
    assert builder.append(timestamp=None, key=b"k", value=b"v", headers=None)
    assert [list(r.headers) for r in _read(builder)] == [[]]


def test_the_producer_state_cannot_change_once_the_batch_is_built() -> None:
    builder = RecordBatchBuilder(1 << 20)
    builder.append(timestamp=None, key=b"k", value=b"v", headers=[])
    builder._build()
    with pytest.raises(RuntimeError):
        builder._set_producer_state(42, 3, 17)


def _outbound(count: int, size: int = 900) -> list[OutboundRecord]:
    return [OutboundRecord(f"r-{i:05d}".encode(), bytes([i % 251]) * size, HEADERS) for i in range(count)]


def test_extend_lays_out_the_bytes_append_lays_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(record_batch.time, "time", lambda: 1_700_000_000.0)
    records = _outbound(40, size=20_000)  # value lengths past the varint table
    one_by_one, at_once = RecordBatchBuilder(8 << 20), RecordBatchBuilder(8 << 20)
    for record in records:
        one_by_one.append(timestamp=None, key=record.key, value=record.value, headers=record.headers)
    assert at_once.extend(records) == 40
    assert at_once._build() == one_by_one._build()


def test_extend_stops_where_append_would_refuse_and_goes_on_from_there() -> None:
    records = _outbound(100)
    appended, first = RecordBatchBuilder(16_384), RecordBatchBuilder(16_384)
    fits = sum(
        1
        for record in records
        if appended.append(timestamp=None, key=record.key, value=record.value, headers=record.headers)
    )
    assert first.extend(records) == fits < 100
    assert first.closed() and first.extend(records, fits) == 0
    second = RecordBatchBuilder(16_384)
    assert second.extend(records, fits) == fits  # the next batch starts where it stopped
    assert [r.key for r in _read(second)] == [r.key for r in records[fits : 2 * fits]]


def test_extend_takes_a_record_larger_than_the_batch_into_an_empty_one() -> None:
    builder = RecordBatchBuilder(1_000)
    assert builder.extend(_outbound(3, size=5_000)) == 1
    [record] = list(_read(builder))
    assert len(record.value) == 5_000
