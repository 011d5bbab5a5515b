"""KafkaWriter: the partition of each key, and what a stopped writer answers."""

from __future__ import annotations

import asyncio
import random

import pytest
from aiokafka.partitioner import DefaultPartitioner

from mlgate.workers.errors import WorkerError
from mlgate.workers.sinks.kafka_writer import KafkaWriter, partitions_for
from mlgate.workers.sinks.records import OutboundRecord


def test_partitions_match_aiokafkas_default_partitioner() -> None:
    chooser = DefaultPartitioner()
    rng = random.Random(7)
    keys = [rng.randbytes(rng.choice([0, 1, 3, 4, 7, 8, 13, 32, 36])) for _ in range(5000)]
    keys += [f"r-{i}".encode() for i in range(2000)]  # many keys of one length
    for partitions in ([0], [0, 1, 2], list(range(7)), [3, 5, 9, 11]):
        expected = [chooser(key, partitions, partitions) for key in keys]
        assert partitions_for(keys, partitions) == expected


def test_keys_of_the_same_record_id_always_share_a_partition() -> None:
    keys = [b"sensor-1", b"sensor-2"] * 50
    chosen = partitions_for(keys, [0, 1, 2])
    assert len({chosen[i] for i in range(0, 100, 2)}) == 1
    assert len({chosen[i] for i in range(1, 100, 2)}) == 1


async def test_cancelled_dispatch_fails_the_request_rather_than_resolving_it(
    make_settings, kafka_broker, kafka_topic: str
) -> None:
    writer = KafkaWriter(
        make_settings(kafka_bootstrap_servers=kafka_broker.bootstrap, kafka_topic=kafka_topic)
    )
    await writer.start()
    blocked = asyncio.Event()

    async def stuck_send(items: object) -> None:
        blocked.set()
        await asyncio.Event().wait()

    writer._send = stuck_send  # type: ignore[method-assign]
    future = writer.submit([OutboundRecord(key=b"k", value=b"v", headers=[])])
    await blocked.wait()
    await writer.close(drain_s=0.1)
    with pytest.raises(WorkerError):  # failed, never reported as written
        await future


async def test_cancelled_wait_for_an_in_flight_slot_fails_the_request(
    make_settings, kafka_broker, kafka_topic: str
) -> None:
    writer = KafkaWriter(
        make_settings(
            kafka_bootstrap_servers=kafka_broker.bootstrap,
            kafka_topic=kafka_topic,
            writer_max_in_flight=1,
        )
    )
    await writer.start()
    await writer._in_flight.acquire()  # the one slot is taken: the next batch waits for it
    future = writer.submit([OutboundRecord(key=b"k", value=b"v", headers=[])])
    await asyncio.sleep(0.05)
    await writer.close(drain_s=0.1)
    with pytest.raises(WorkerError):  # failed, never left waiting forever
        await asyncio.wait_for(future, 2)
