"""Topic set-up and counting for the benchmark: what landed is read from the broker.

Counting does not trust ListOffsets alone: Tansu (0.6) answers "latest" with the base
offset of a partition's last batch rather than one past its last record. So the
count reads each partition's tail from that offset and takes the last offset seen
(offsets are dense in a topic that is neither compacted nor transactional); or, with
``read_all``, reads every record.

Tansu's memory engine also slows down as it holds more data (about 85k records/s of
2.7 KB into an empty broker, 45k once it holds a million), so the benchmark deletes
each topic once counted: each path starts on an empty broker.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

FETCH_MAX_BYTES = 64 * 1024 * 1024
QUIET_POLLS = 3


async def create_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names]
        )
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(names)
    finally:
        await admin.close()


async def count_records(bootstrap: str, topic: str, *, read_all: bool = False) -> int:
    """Records in ``topic``, read back with a consumer assigned to every partition."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=FETCH_MAX_BYTES,
        max_partition_fetch_bytes=FETCH_MAX_BYTES // 4,
    )
    await consumer.start()
    try:
        await consumer.topics()
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        starts = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, starts[tp] if read_all else max(starts[tp], ends[tp] - 1))
        seen = {tp: 0 for tp in tps}
        after_last = dict(ends)
        quiet = 0
        while quiet < QUIET_POLLS:
            fetched = await consumer.getmany(timeout_ms=200, max_records=100_000)
            quiet = 0 if fetched else quiet + 1
            for tp, messages in fetched.items():
                seen[tp] += len(messages)
                after_last[tp] = max(after_last[tp], messages[-1].offset + 1)
        if read_all:
            return sum(seen.values())
        return sum(after_last[tp] - starts[tp] for tp in tps)
    finally:
        await consumer.stop()


async def wait_for_count(
    bootstrap: str, topic: str, expected: int, timeout_s: float, *, read_all: bool = False
) -> int:
    """The record count of ``topic`` once it reaches ``expected``, or at ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        count = await count_records(bootstrap, topic, read_all=read_all)
        if count >= expected:
            return count
        if time.monotonic() >= deadline:
            # Short by a partial batch (seen: 172 of 1.7M) can be the tail reading
            # missing a partition's last batch on a busy broker: reading every record
            # is slow but decides.
            return count if read_all else await count_records(bootstrap, topic, read_all=True)
        await asyncio.sleep(0.5)
