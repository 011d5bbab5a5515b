"""What the spilling sink's refusals tell the ingest pipeline: a refusal (the records
went nowhere, their record ids can be released) only when none of them can have
landed."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from mlgate.workers.errors import SinkFailed
from mlgate.workers.sinks.records import OutboundRecord
from mlgate.workers.sinks.spilling_sink import SpillFull
from tests.support import KafkaBroker, started_spilling_sink, stop_process


def _records(n: int, start: int = 0) -> list[OutboundRecord]:
    return [OutboundRecord(key=f"r{i}".encode(), value=b"{}", headers=[]) for i in range(start, start + n)]


async def test_a_full_spill_without_trying_kafka_wrote_nothing(
    make_settings, private_kafka_broker: KafkaBroker
) -> None:
    sink, _ = await started_spilling_sink(make_settings, private_kafka_broker, spill_max_records=2, kafka_breaker_fail_max=1)
    try:
        private_kafka_broker.stop()
        await sink.write(_records(1))  # Kafka fails: spilled, and the breaker opens
        with pytest.raises(SpillFull) as refused:
            await sink.write(_records(2, start=1))
        assert refused.value.nothing_written
    finally:
        await sink.close(drain_s=0)


async def test_a_full_spill_after_kafka_left_the_write_unanswered_may_have_written_some(
    make_settings, private_kafka_broker: KafkaBroker
) -> None:
    """The broker frozen: the produce goes unanswered, so Kafka may hold the records."""
    sink, _ = await started_spilling_sink(make_settings, private_kafka_broker, spill_max_records=1)
    try:
        await sink.write(_records(1, start=10))  # connected: the next produce is sent
        with _frozen(private_kafka_broker):
            with pytest.raises(SpillFull) as refused:
                await sink.write(_records(2))
        assert not refused.value.nothing_written
    finally:
        await sink.close(drain_s=0)


async def test_a_full_spill_after_kafka_was_tried_is_never_taken_for_nothing_written(
    make_settings, private_kafka_broker: KafkaBroker
) -> None:
    """The broker gone at an outage's start (breaker still closed): Kafka acknowledged
    none of the records, yet aiokafka retries a batch itself, and an answer lost on an
    earlier attempt comes back as the last attempt's error: it may hold them."""
    sink, _ = await started_spilling_sink(make_settings, private_kafka_broker, spill_max_records=1)
    try:
        private_kafka_broker.stop()
        with pytest.raises(SpillFull) as refused:
            await sink.write(_records(2))
        assert not refused.value.nothing_written
    finally:
        await sink.close(drain_s=0)


async def test_a_closed_spill_after_an_unanswered_kafka_write_is_a_failure_not_a_refusal(
    make_settings, private_kafka_broker: KafkaBroker
) -> None:
    """The spill's writer refusing what Kafka did not answer (closed, or its mailbox
    full) must not read as "nothing written": Kafka may hold part of the write."""
    sink, _ = await started_spilling_sink(make_settings, private_kafka_broker)
    try:
        await sink.write(_records(1, start=10))  # connected: the next produce is sent
        await sink._spill.close()
        with _frozen(private_kafka_broker), pytest.raises(SinkFailed, match="spill refused"):
            await sink.write(_records(2))
    finally:
        await sink.close(drain_s=0)


@contextmanager
def _frozen(broker: KafkaBroker) -> Iterator[None]:
    assert broker.process is not None
    stop_process(broker.process.pid)
    try:
        yield
    finally:
        os.kill(broker.process.pid, signal.SIGCONT)
