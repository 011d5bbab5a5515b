"""The spill drainer: its log cursor survives the segments it deletes, and a crashed
drainer is reported unhealthy and comes back, rebuilt from the forwarded offset; the
backlog is what the log holds past that offset, whatever crashed or gave up on the way."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from mlgate.workers.sinks.kafka_writer import KafkaWriteFailed, KafkaWriter
from mlgate.workers.sinks.local_log import (
    LocalLog,
    LogCursor,
    LogEntry,
    delete_segments_before,
    frame,
    segments,
)
from mlgate.workers.sinks.records import OutboundRecord
from mlgate.workers.sinks.spilling_sink import SpillingKafkaSink, read_forwarded_offset
from mlgate.workers.telemetry import NO_TELEMETRY
from tests.support import (
    KafkaBroker,
    create_topic,
    read_topic,
    restart_with_topic,
    until,
    wait_until_drained,
)

# A frame of exactly 512 bytes: a 4096-byte segment holds eight of them.
_FRAME_BYTES = 512
_PER_SEGMENT = 8


def _record(i: int) -> OutboundRecord:
    key = f"r{i:05d}".encode()
    # A value of n >= 256 bytes costs n + 3 bytes of msgpack (bin 16), an empty one 2.
    padding = _FRAME_BYTES - len(frame(OutboundRecord(key=key, value=b"", headers=[])))
    record = OutboundRecord(key=key, value=b"x" * (padding - 1), headers=[])
    assert len(frame(record)) == _FRAME_BYTES
    return record


def _records(n: int) -> list[OutboundRecord]:
    return [_record(i) for i in range(n)]


def test_cursor_reads_on_after_the_segment_it_finished_is_deleted(tmp_path: Path) -> None:
    log = LocalLog(tmp_path, segment_bytes=4096)
    log.append([frame(r) for r in _records(3 * _PER_SEGMENT)])
    log.close()
    assert len(segments(tmp_path)) == 3
    cursor = LogCursor(tmp_path, 0)

    first = cursor.read(_PER_SEGMENT)  # ends exactly at the first segment's end
    assert [e.offset for e in first] == list(range(_PER_SEGMENT))
    delete_segments_before(tmp_path, cursor.offset)  # as the drainer does once forwarded

    rest = cursor.read(100)
    assert [e.offset for e in rest] == list(range(_PER_SEGMENT, 3 * _PER_SEGMENT))


async def _spilled_sink(
    make_settings,
    broker: KafkaBroker,
    records: int,
    telemetry=NO_TELEMETRY,
    sink_class: type[SpillingKafkaSink] = SpillingKafkaSink,
) -> tuple[SpillingKafkaSink, str]:
    """A sink on a fresh topic of ``broker`` with ``records`` spilled while the broker
    is down (it is still down when this returns)."""
    topic = await create_topic(broker.bootstrap)
    settings = make_settings(
        kafka_bootstrap_servers=broker.bootstrap,
        kafka_topic=topic,
        kafka_request_timeout_ms=500,
        kafka_breaker_reset_s=0.2,
        log_segment_bytes=4096,
        spill_drain_batch_records=_PER_SEGMENT,  # each drain read ends at a segment's end
    )
    broker.stop()
    sink = sink_class(settings, telemetry)
    await sink.start()
    await sink.write(_records(records))
    assert sink.backlog == records
    return sink, topic


async def test_drainer_forwards_across_segment_ends_without_crashing(
    make_settings, private_kafka_broker: KafkaBroker
) -> None:
    sink, topic = await _spilled_sink(make_settings, private_kafka_broker, 5 * _PER_SEGMENT)
    try:
        await restart_with_topic(private_kafka_broker, topic, sink.breaker)
        await wait_until_drained(sink)
        assert sink._drainer.crashes == 0
    finally:
        await sink.close()
    messages = await read_topic(private_kafka_broker.bootstrap, topic, expected=5 * _PER_SEGMENT)
    assert sorted(m.key for m in messages) == [r.key for r in _records(5 * _PER_SEGMENT)]


class _CrashingCursor(LogCursor):
    """A cursor in a state its loop cannot go on from (as the lost segment was)."""

    def read(self, max_records: int) -> list[LogEntry]:
        raise FileNotFoundError("segment gone")


class _HealthAtCrash(type(NO_TELEMETRY)):  # type: ignore[misc]
    """Notes what the sink says about itself when its drainer crashes."""

    def __init__(self) -> None:
        self.sink: SpillingKafkaSink | None = None
        self.seen: list[tuple[bool, int]] = []

    def background_task_crashed(self, task: str) -> None:
        # Looked at once the supervisor has taken the crash in (and waits to restart).
        asyncio.get_running_loop().call_soon(self._look)

    def _look(self) -> None:
        assert self.sink is not None
        self.seen.append((self.sink.healthy, self.sink.backlog))


async def test_a_crashed_drainer_makes_the_sink_unhealthy_then_resumes_from_the_forwarded_offset(
    make_settings, private_kafka_broker: KafkaBroker
) -> None:
    telemetry = _HealthAtCrash()
    sink, topic = await _spilled_sink(make_settings, private_kafka_broker, 20, telemetry)
    telemetry.sink = sink
    sink._cursor = _CrashingCursor(sink._directory, 0)
    try:
        await restart_with_topic(private_kafka_broker, topic, sink.breaker)
        await wait_until_drained(sink)
        assert telemetry.seen == [(False, 20)]
        assert sink._drainer.crashes == 1
    finally:
        await sink.close()
    messages = await read_topic(private_kafka_broker.bootstrap, topic, expected=20)
    assert sorted(m.key for m in messages) == [r.key for r in _records(20)]


class _FirstWritePartial(KafkaWriter):
    """A real writer whose first write lands only its first record and then fails, as
    a write Kafka acknowledged in part."""

    failed = False

    async def write(self, records: list[OutboundRecord], lane: str = "") -> None:
        if self.failed:
            await super().write(records)
            return
        type(self).failed = True
        await super().write(records[:1])
        raise KafkaWriteFailed("partly acknowledged", records[1:], outcome_unknown=0)


async def test_a_partial_drain_that_opens_the_breaker_sends_only_what_kafka_did_not_take(
    make_settings, private_kafka_broker: KafkaBroker
) -> None:
    """The failure that opens the breaker reaches the drainer as BreakerOpen: it still
    tells which records Kafka acknowledged, and those are not sent twice."""
    topic = await create_topic(private_kafka_broker.bootstrap)
    settings = make_settings(
        kafka_bootstrap_servers=private_kafka_broker.bootstrap, kafka_topic=topic,
        kafka_request_timeout_ms=500, kafka_breaker_reset_s=0.2, kafka_breaker_fail_max=1,
    )
    private_kafka_broker.stop()
    sink = SpillingKafkaSink(settings, NO_TELEMETRY)
    await sink.start()
    await sink.write(_records(3))
    assert sink.backlog == 3
    assert not sink._kafka.started  # Kafka was down at start: the drainer starts it
    _FirstWritePartial.failed = False
    sink._kafka = _FirstWritePartial(settings, telemetry=NO_TELEMETRY)
    try:
        await restart_with_topic(private_kafka_broker, topic, sink.breaker)
        await wait_until_drained(sink)
    finally:
        await sink.close()
    assert _FirstWritePartial.failed
    messages = await read_topic(private_kafka_broker.bootstrap, topic, expected=3)
    assert sorted(m.key for m in messages) == [r.key for r in _records(3)]


class _ForwardedOffsetFailsOnce(SpillingKafkaSink):
    """Kafka acknowledged the first drain batch, then recording it failed (a full
    disk): with the forwarded segments deleted first, or not even that."""

    segments_deleted_first = True
    failed = False

    def _mark_forwarded(self, offset: int) -> None:
        if type(self).failed:
            super()._mark_forwarded(offset)
            return
        type(self).failed = True
        if self.segments_deleted_first:
            delete_segments_before(self._directory, offset)
        raise OSError(28, "No space left on device")


@pytest.mark.parametrize(
    "segments_deleted_first", [True, False], ids=["segments-deleted", "nothing-deleted"]
)
async def test_a_drainer_that_cannot_record_an_acknowledged_batch_drains_on_sending_nothing_twice(
    make_settings, private_kafka_broker: KafkaBroker, segments_deleted_first: bool
) -> None:
    """A review: the drainer crashed, restarted from the file's offset, sent the same
    batch again and failed again, for as long as the disk stayed full (one batch nine
    times in Kafka, the rest of the spill never reached)."""
    _ForwardedOffsetFailsOnce.segments_deleted_first = segments_deleted_first
    _ForwardedOffsetFailsOnce.failed = False
    sink, topic = await _spilled_sink(
        make_settings, private_kafka_broker, 3 * _PER_SEGMENT, sink_class=_ForwardedOffsetFailsOnce
    )
    try:
        await restart_with_topic(private_kafka_broker, topic, sink.breaker)
        await wait_until_drained(sink)
        assert _ForwardedOffsetFailsOnce.failed
        assert sink._drainer.crashes == 0
        # An empty backlog sends the next write to Kafka directly, not to the spill.
        spilled_before = sink._spill.accepted_offset
        await sink.write([_record(999)])
        assert sink._spill.accepted_offset == spilled_before
    finally:
        await sink.close()
    # A later batch's ack wrote the file.
    assert read_forwarded_offset(sink._directory) == 3 * _PER_SEGMENT
    messages = await read_topic(
        private_kafka_broker.bootstrap, topic, expected=3 * _PER_SEGMENT + 1
    )
    assert sorted(m.key for m in messages) == sorted(
        r.key for r in [*_records(3 * _PER_SEGMENT), _record(999)]
    )


async def test_a_spill_whose_offset_file_is_behind_its_deleted_segments_drains_from_the_first_left(
    make_settings, private_kafka_broker: KafkaBroker
) -> None:
    """A crash between deleting the forwarded segments and writing the file: the file's
    offset lies in no segment left. The restarted sink reads on from the first one
    (its drainer crashed for ever on a cursor that read nothing)."""
    sink, topic = await _spilled_sink(make_settings, private_kafka_broker, 3 * _PER_SEGMENT)
    await sink.close()
    delete_segments_before(sink._directory, _PER_SEGMENT)  # Kafka had the first segment's
    assert read_forwarded_offset(sink._directory) == 0
    private_kafka_broker.start()
    await create_topic(private_kafka_broker.bootstrap, name=topic)
    restarted = SpillingKafkaSink(sink._settings)
    await restarted.start()
    try:
        assert restarted.backlog == 2 * _PER_SEGMENT
        await wait_until_drained(restarted)
        assert restarted._drainer.crashes == 0
    finally:
        await restarted.close()
    messages = await read_topic(private_kafka_broker.bootstrap, topic, expected=2 * _PER_SEGMENT)
    assert sorted(m.key for m in messages) == sorted(
        r.key for r in _records(3 * _PER_SEGMENT)[_PER_SEGMENT:]
    )


@pytest.mark.parametrize("damage", [b"12x", b"\xff\xfe", b"-"], ids=["not-a-number", "not-text", "sign-alone"])
async def test_a_spill_whose_offset_file_is_damaged_starts_and_drains_from_its_first_segment(
    make_settings, private_kafka_broker: KafkaBroker, damage: bytes
) -> None:
    """A review: ``12x`` in ``forwarded.offset`` failed the start with a traceback, and
    every spilled record, each answered 202, stayed stranded."""
    sink, topic = await _spilled_sink(make_settings, private_kafka_broker, 3)
    await sink.close()
    (sink._directory / "forwarded.offset").write_bytes(damage)
    private_kafka_broker.start()
    await create_topic(private_kafka_broker.bootstrap, name=topic)
    restarted = SpillingKafkaSink(sink._settings)
    with capture_logs() as logs:
        await restarted.start()
    try:
        assert "spill_offset_unreadable" in [line["event"] for line in logs]
        await wait_until_drained(restarted)
    finally:
        await restarted.close()
    messages = await read_topic(private_kafka_broker.bootstrap, topic, expected=3)
    assert sorted(m.key for m in messages) == sorted(r.key for r in _records(3))


async def test_close_lets_the_drain_batch_in_flight_end_and_records_it(
    make_settings, private_kafka_broker: KafkaBroker
) -> None:
    """A review: close cancelled the drainer mid-write; the produce still landed with
    the writer's flush, ``forwarded.offset`` stayed behind it, and the next start sent
    the batch again."""
    sink, topic = await _spilled_sink(make_settings, private_kafka_broker, _PER_SEGMENT)
    gate, writing = asyncio.Event(), asyncio.Event()
    write = sink._kafka.write

    async def gated_write(records: list[OutboundRecord], lane: str = "") -> None:
        writing.set()
        await gate.wait()
        await write(records, lane)

    sink._kafka.write = gated_write  # type: ignore[method-assign]
    private_kafka_broker.start()
    await create_topic(private_kafka_broker.bootstrap, name=topic)
    await asyncio.wait_for(writing.wait(), 15)
    closing = asyncio.create_task(sink.close())
    await asyncio.sleep(0.2)
    assert not closing.done()  # waiting for the batch in flight
    gate.set()
    await asyncio.wait_for(closing, 15)
    assert read_forwarded_offset(sink._directory) == _PER_SEGMENT
    messages = await read_topic(private_kafka_broker.bootstrap, topic, expected=_PER_SEGMENT)
    assert sorted(m.key for m in messages) == [r.key for r in _records(_PER_SEGMENT)]


async def test_a_spill_write_its_caller_gave_up_on_is_still_in_the_backlog_and_forwarded(
    make_settings, private_kafka_broker: KafkaBroker
) -> None:
    """The caller is cancelled while the log writes its records: they are written all
    the same, so they wait for Kafka like any spilled record (no direct write may pass
    them) and the drainer forwards them."""
    sink, topic = await _spilled_sink(make_settings, private_kafka_broker, 1)
    try:
        given_up = asyncio.create_task(sink.write([_record(500), _record(501)]))
        await asyncio.sleep(0)  # handed to the log writer, its fsync not done
        given_up.cancel()
        with pytest.raises(asyncio.CancelledError):
            await given_up
        assert sink.backlog == 3
        await restart_with_topic(private_kafka_broker, topic, sink.breaker)
        await wait_until_drained(sink)
    finally:
        await sink.close()
    messages = await read_topic(private_kafka_broker.bootstrap, topic, expected=3)
    assert sorted(m.key for m in messages) == [_record(0).key, _record(500).key, _record(501).key]


def _failing_appends(sink: SpillingKafkaSink, error: Exception) -> None:
    """The spill's next appends raise ``error`` (a full disk, or a fault that stops
    the log writer)."""
    log = sink._spill._log
    assert log is not None

    def append(frames: list[bytes]) -> int:
        raise error

    log.append = append  # type: ignore[method-assign]


async def test_a_given_up_spill_write_whose_append_fails_gives_its_tenants_share_back(
    make_settings, private_kafka_broker: KafkaBroker
) -> None:
    sink, _ = await _spilled_sink(make_settings, private_kafka_broker, 1)
    try:
        _failing_appends(sink, OSError(28, "No space left on device"))
        given_up = asyncio.create_task(sink.write([_record(500), _record(501)], tenants=[("a", 2)]))
        await asyncio.sleep(0)  # handed to the log writer
        given_up.cancel()
        with pytest.raises(asyncio.CancelledError):
            await given_up
        # Until the log writer has failed the append and its callbacks have run (the
        # backlog is back a turn before the shares are).
        await until(lambda: sink.backlog == 1 and sink._shares.held_by("a") == 0)
    finally:
        await sink.close()


async def test_a_crashed_spill_writer_leaves_no_backlog_it_never_wrote(
    make_settings, private_kafka_broker: KafkaBroker
) -> None:
    """Writes the log writer failed as it stopped are not in the log: the backlog is
    the log's own end again, so the drainer can empty it and direct writes resume."""
    sink, _ = await _spilled_sink(make_settings, private_kafka_broker, 1)
    try:
        _failing_appends(sink, ValueError("I/O operation on closed file"))
        with pytest.raises(Exception):  # noqa: B017 - the writer's crash, as its caller sees it
            await sink.write(_records(4))
        for _ in range(100):
            if not sink._spill.running:
                break
            await asyncio.sleep(0.01)
        assert not sink._spill.running
        assert sink.backlog == 1  # the record written before, not the 4 never written
        assert not sink.healthy
    finally:
        await sink.close()


async def test_a_spill_drained_to_its_end_keeps_no_segment_of_forwarded_records(
    make_settings, private_kafka_broker: KafkaBroker
) -> None:
    """The segment written to was never deleted: a spill that filled its disk kept it
    full once all was forwarded, its offset file unwritten, and each restart sent the
    whole spill again (a review)."""
    spilled = 2 * _PER_SEGMENT + 3  # the last segment part full
    sink, topic = await _spilled_sink(make_settings, private_kafka_broker, spilled)
    directory = sink._directory
    try:
        await restart_with_topic(private_kafka_broker, topic, sink.breaker)
        await wait_until_drained(sink)
        await until(lambda: read_forwarded_offset(directory) == spilled)
        assert [(int(path.stem), path.stat().st_size) for path in segments(directory)] == [(spilled, 0)]
        await sink.write(_records(1))  # Kafka back: straight there, the spill as it was
    finally:
        await sink.close()
    reopened = LocalLog(directory)
    try:
        assert reopened.next_offset == spilled  # offsets go on where they were
    finally:
        reopened.close()
