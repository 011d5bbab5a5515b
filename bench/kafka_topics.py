"""Topic set-up and counting for the benchmark: what landed is read from the broker."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic


async def create_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names]
        )
    finally:
        await admin.close()


async def count_records(bootstrap: str, topic: str) -> int:
    """Records in ``topic``: the sum over its partitions of end minus beginning offset."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        return sum(ends[tp] - starts[tp] for tp in tps)
    finally:
        await consumer.stop()


async def wait_for_count(bootstrap: str, topic: str, expected: int, timeout_s: float) -> int:
    """The record count of ``topic`` once it reaches ``expected``, or at ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        count = await count_records(bootstrap, topic)
        if count >= expected or time.monotonic() >= deadline:
            return count
        await asyncio.sleep(0.5)
