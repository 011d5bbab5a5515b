"""The spill in lanes: a tenant writing in a lane of its own holds at most three
quarters of the spill through a Kafka outage, the rest kept for the others; the
drainer forwards nothing spilled while a write sent to Kafka directly before it is
still unanswered."""

from __future__ import annotations

import asyncio

import pytest

from mlgate.workers.lanes import SHARED_LANE
from mlgate.workers.sinks.records import OutboundRecord
from mlgate.workers.sinks.spilling_sink import SpillFull, SpillingKafkaSink
from tests.support import (
    KafkaBroker,
    create_topic,
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


async def test_a_tenant_in_its_own_lane_holds_at_most_three_quarters_of_the_spill(
    make_settings, private_kafka_broker: KafkaBroker
) -> None:
    sink, _ = await _sink(make_settings, private_kafka_broker, spill_max_records=8)
    try:
        private_kafka_broker.stop()
        for n in range(6):
            await sink.write(_records(f"f{n}-", 1), lane="flood")
        with pytest.raises(SpillFull) as refused:
            await sink.write(_records("f6-", 1), lane="flood")
        assert "share of the spill" in str(refused.value)
        await sink.write(_records("c", 2), lane=SHARED_LANE)  # the rest is the others'
        assert sink.backlog == 8
    finally:
        await sink.close(drain_s=0)


async def test_a_tenants_share_of_the_spill_frees_as_the_drainer_forwards_it(
    make_settings, private_kafka_broker: KafkaBroker
) -> None:
    sink, topic = await _sink(make_settings, private_kafka_broker, spill_max_records=8)
    try:
        private_kafka_broker.stop()
        await sink.write(_records("a", 6), lane="flood")
        with pytest.raises(SpillFull):
            await sink.write(_records("b", 1), lane="flood")
        private_kafka_broker.start()
        await create_topic(private_kafka_broker.bootstrap, partitions=1, name=topic)  # memory storage
        await wait_until_drained(sink)
        await sink.write(_records("b", 6), lane="flood")  # its share is free again
    finally:
        await sink.close()
    keys = {m.key for m in await read_topic(private_kafka_broker.bootstrap, topic, expected=12)}
    assert keys == {f"a{i}".encode() for i in range(6)} | {f"b{i}".encode() for i in range(6)}


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
        await sink._to_spill(_records("second", 3), SHARED_LANE, kafka_took_none=True)
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
