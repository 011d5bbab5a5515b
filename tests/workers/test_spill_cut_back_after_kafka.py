"""A spill append cut back after Kafka was tried is no refusal: Kafka may hold the
records, so their dedup claims must stay (a review: they were released, and a resend
was written to Kafka twice)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from mlgate.config import Settings
from mlgate.service.ingest.pipeline import refused
from mlgate.workers.errors import SinkFailed
from mlgate.workers.sinks.records import OutboundRecord
from tests.support import KafkaBroker, started_spilling_sink


def _records(count: int, start: int = 0) -> list[OutboundRecord]:
    return [OutboundRecord(key=f"r{i}".encode(), value=b"{}", headers=[]) for i in range(start, start + count)]


@contextmanager
def _frozen(broker: KafkaBroker) -> Iterator[None]:
    os.kill(broker.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(broker.process.pid, signal.SIGCONT)


async def test_a_spill_append_cut_back_after_an_unanswered_produce_is_not_a_refusal(
    make_settings: Callable[..., Settings], private_kafka_broker: KafkaBroker
) -> None:
    sink, _ = await started_spilling_sink(make_settings, private_kafka_broker)
    try:
        await sink.write(_records(1, start=10))  # connected: the next produce is sent
        log = sink._spill._log
        assert log is not None
        sync = log._sync_written

        def failing_once() -> None:
            log._sync_written = sync  # type: ignore[method-assign]
            raise OSError(28, "No space left on device")

        log._sync_written = failing_once  # type: ignore[method-assign]
        with _frozen(private_kafka_broker), pytest.raises(SinkFailed) as failure:
            await sink.write(_records(2))
        assert not log.broken  # the spill's append was cut back: the spill holds none
        assert not failure.value.nothing_written
        assert not refused(failure.value)
    finally:
        await sink.close(drain_s=0)
