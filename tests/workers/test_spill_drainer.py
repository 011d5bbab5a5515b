"""The spill drainer: its log cursor survives the segments it deletes, and a crashed
drainer is reported unhealthy and comes back, rebuilt from the forwarded offset."""

from __future__ import annotations

import asyncio
from pathlib import Path

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
from mlgate.workers.sinks.spilling_sink import SpillingKafkaSink
from mlgate.workers.telemetry import NO_TELEMETRY
from tests.support import KafkaBroker, create_topic, read_topic, wait_until_drained

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
    make_settings, broker: KafkaBroker, records: int, telemetry=NO_TELEMETRY
) -> tuple[SpillingKafkaSink, str]:
    """A sink on a fresh topic of ``broker`` with ``records`` spilled while the broker
    was down; the broker is up again (and the topic made) when this returns."""
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
    sink = SpillingKafkaSink(settings, telemetry)
    await sink.start()
    await sink.write(_records(records))
    assert sink.backlog == records
    return sink, topic


async def test_drainer_forwards_across_segment_ends_without_crashing(
    make_settings, private_kafka_broker: KafkaBroker
) -> None:
    sink, topic = await _spilled_sink(make_settings, private_kafka_broker, 5 * _PER_SEGMENT)
    try:
        private_kafka_broker.start()
        await create_topic(private_kafka_broker.bootstrap, name=topic)
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
        private_kafka_broker.start()
        await create_topic(private_kafka_broker.bootstrap, name=topic)
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
        private_kafka_broker.start()
        await create_topic(private_kafka_broker.bootstrap, name=topic)
        await wait_until_drained(sink)
    finally:
        await sink.close()
    assert _FirstWritePartial.failed
    messages = await read_topic(private_kafka_broker.bootstrap, topic, expected=3)
    assert sorted(m.key for m in messages) == [r.key for r in _records(3)]
