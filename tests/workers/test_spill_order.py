"""The spill and the writer's lanes: the drainer forwards nothing spilled while a
write sent to Kafka directly before it is still unanswered (in a lane of its own, the
drainer's write could overtake it)."""

from __future__ import annotations

import asyncio

from mlgate.workers.sinks.records import OutboundRecord
from mlgate.workers.sinks.spilling_sink import SpillingKafkaSink
from tests.support import (
    KafkaBroker,
    read_topic,
    started_spilling_sink,
    wait_until_drained,
)


def _records(tag: str, n: int) -> list[OutboundRecord]:
    return [OutboundRecord(key=f"{tag}{i}".encode(), value=b"{}", headers=[]) for i in range(n)]


async def _sink(make_settings, broker: KafkaBroker, **overrides) -> tuple[SpillingKafkaSink, str]:  # type: ignore[no-untyped-def]
    """A started spilling sink on a topic of one partition (the order records reach
    Kafka in is the order they are read in), its breaker open at the first failure."""
    return await started_spilling_sink(
        make_settings, broker, partitions=1, kafka_breaker_fail_max=1, kafka_breaker_reset_s=0.2,
        **overrides,
    )


async def test_spilled_records_wait_for_the_direct_write_accepted_before_them(
    make_settings, private_kafka_broker: KafkaBroker
) -> None:
    sink, topic = await _sink(make_settings, private_kafka_broker)
    kafka = sink._kafka
    answer_direct_write = asyncio.Event()
    write_within = kafka.write_within

    async def unanswered_until_told(records, seconds, lane=""):  # type: ignore[no-untyped-def]
        await answer_direct_write.wait()
        await write_within(records, seconds, lane)

    kafka.write_within = unanswered_until_told  # type: ignore[method-assign]
    try:
        direct = asyncio.ensure_future(sink.write(_records("first", 3), lane="flood"))
        await asyncio.sleep(0.05)
        # A later write spilled (a backlog began meanwhile): the drainer has it.
        await sink._to_spill(_records("second", 3), [("calm", 3)], kafka_took_none=True)
        await asyncio.sleep(0.5)
        assert sink.backlog == 3  # not forwarded ahead of the direct write
        answer_direct_write.set()
        await direct
        await wait_until_drained(sink)
    finally:
        await sink.close()
    keys = [m.key for m in await read_topic(private_kafka_broker.bootstrap, topic, expected=6)]
    assert sorted(keys) == sorted(k.key for k in _records("first", 3) + _records("second", 3))
    assert max(keys.index(k.key) for k in _records("first", 3)) < min(
        keys.index(k.key) for k in _records("second", 3)
    )
