"""KafkaWriter: the partition of each key, and what a stopped writer answers."""

from __future__ import annotations

import asyncio
import random

import pytest
from aiokafka.partitioner import DefaultPartitioner

from mlgate.workers.errors import MailboxFull, WorkerError
from mlgate.workers.lanes import SHARED_LANE
from mlgate.workers.sinks.kafka_writer import KafkaWriter, partitions_for
from mlgate.workers.sinks.records import OutboundRecord
from tests.support import create_topic, read_topic


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
    writer = await _started_writer(make_settings, kafka_broker, kafka_topic, writer_max_in_flight=1)
    await writer._in_flight.acquire()  # the one slot is taken: the next batch waits for it
    future = writer.submit([OutboundRecord(key=b"k", value=b"v", headers=[])])
    await asyncio.sleep(0.05)
    await writer.close(drain_s=0.1)
    with pytest.raises(WorkerError):  # failed, never left waiting forever
        await asyncio.wait_for(future, 2)


def _record(key: bytes = b"same-key") -> list[OutboundRecord]:
    return [OutboundRecord(key=key, value=b"v", headers=[])]


async def _started_writer(make_settings, kafka_broker, topic: str, **settings: object) -> KafkaWriter:  # type: ignore[no-untyped-def]
    writer = KafkaWriter(
        make_settings(kafka_bootstrap_servers=kafka_broker.bootstrap, kafka_topic=topic, **settings)
    )
    await writer.start()
    return writer


async def _lingering_writer(make_settings, kafka_broker, kafka_topic: str) -> KafkaWriter:  # type: ignore[no-untyped-def]
    """A started writer whose linger (ten minutes) only ends when its batches are answered."""
    return await _started_writer(make_settings, kafka_broker, kafka_topic, kafka_linger_ms=600_000)


async def test_a_write_to_an_idle_writer_is_sent_without_lingering(
    make_settings, kafka_broker, kafka_topic: str
) -> None:
    writer = await _lingering_writer(make_settings, kafka_broker, kafka_topic)
    try:
        # Nothing in flight: sent at once, acknowledged long before the linger ends.
        await asyncio.wait_for(writer.write(_record()), 10)
    finally:
        await writer.close(drain_s=1)


async def test_writes_made_while_a_batch_is_in_flight_go_out_together_once_it_is_answered(
    make_settings, kafka_broker, kafka_topic: str
) -> None:
    writer = await _lingering_writer(make_settings, kafka_broker, kafka_topic)
    producer = writer._running_producer
    send_batch = producer.send_batch
    sent: list[int] = []
    first_sent = asyncio.Event()
    first_answer_held = asyncio.Event()

    async def counting_send_batch(batch, topic, *, partition):  # type: ignore[no-untyped-def]
        sent.append(batch.record_count())
        first_sent.set()
        ack = await send_batch(batch, topic, partition=partition)
        if len(sent) > 1:
            return ack
        held: asyncio.Future[object] = asyncio.get_running_loop().create_future()

        async def answer_when_let_go() -> None:
            result = await ack
            await first_answer_held.wait()
            held.set_result(result)

        asyncio.ensure_future(answer_when_let_go())
        return held

    producer.send_batch = counting_send_batch  # type: ignore[method-assign]
    try:
        first = writer.submit(_record())
        await asyncio.wait_for(first_sent.wait(), 10)
        later = []
        for _ in range(5):  # one at a time, each in a loop turn of its own
            later.append(writer.submit(_record()))
            await asyncio.sleep(0.01)
        assert sent == [1]  # the writer lingers while the first batch is unanswered
        first_answer_held.set()
        await asyncio.wait_for(asyncio.gather(first, *later), 10)
        assert sent == [1, 5]
    finally:
        await writer.close(drain_s=1)


@pytest.mark.parametrize("compression", ["none", "gzip"])
async def test_written_records_read_back_from_the_broker_as_sent(
    make_settings, kafka_broker, compression: str
) -> None:
    """Uncompressed: the writer's own record batches (``record_batch``); compressed:
    aiokafka's. A consumer checks each batch's CRC as it reads."""
    topic = await create_topic(kafka_broker.bootstrap)
    writer = KafkaWriter(
        make_settings(
            kafka_bootstrap_servers=kafka_broker.bootstrap,
            kafka_topic=topic,
            kafka_compression=compression,
        )
    )
    await writer.start()
    headers = [("source", b"sensors"), ("tracking_id", b"t-1")]
    sent = [
        OutboundRecord(key=f"r-{i}".encode(), value=b"v" * (i % 3000), headers=headers)
        for i in range(2000)
    ]
    try:
        await writer.write(sent)
    finally:
        await writer.close(drain_s=5)
    read = await read_topic(kafka_broker.bootstrap, topic, expected=len(sent))
    assert sorted((m.key, m.value, list(m.headers)) for m in read) == sorted(
        (r.key, r.value, headers) for r in sent
    )


async def test_requests_taken_together_and_split_over_many_batches_all_land_and_resolve(
    make_settings, kafka_broker
) -> None:
    """Batches of 16 KB: each partition's share of three requests, taken in one turn,
    fills several batches, a request's records running from one batch into the next."""
    topic = await create_topic(kafka_broker.bootstrap)
    writer = await _started_writer(make_settings, kafka_broker, topic, kafka_max_batch_bytes=16_384)
    headers = [("source", b"s")]
    requests = [
        [OutboundRecord(key=f"q{q}-r{i}".encode(), value=b"v" * 700, headers=headers) for i in range(150)]
        for q in range(3)
    ]
    try:
        # Submitted in one turn: the writer takes them together.
        await asyncio.wait_for(asyncio.gather(*(writer.submit(r) for r in requests)), 20)
    finally:
        await writer.close(drain_s=5)
    read = await read_topic(kafka_broker.bootstrap, topic, expected=450)
    assert sorted(m.key for m in read) == sorted(r.key for request in requests for r in request)


async def test_a_tenants_write_is_sent_before_the_writes_another_tenant_queued_first(
    make_settings, kafka_broker, kafka_topic: str
) -> None:
    # A round takes one flood write: the calm one is in the second round, not the 21st.
    writer = await _started_writer(
        make_settings, kafka_broker, kafka_topic, writer_max_batch_records=200
    )
    try:
        answered: list[str] = []

        def write(lane: str, n: int, count: int) -> asyncio.Future[None]:
            records = [
                OutboundRecord(key=f"{lane}-{n}-{i}".encode(), value=b"{}", headers=[])
                for i in range(count)
            ]
            future = writer.submit(records, lane)
            future.add_done_callback(lambda _: answered.append(f"{lane}-{n}"))
            return future

        writes = [write("flood", n, 200) for n in range(20)] + [write("calm", 0, 1)]
        await asyncio.gather(*writes)
        # Kafka answers one connection's requests in order: only the round before
        # the calm write's can be answered before it.
        assert answered.index("calm-0") <= 1
        assert [name for name in answered if name != "calm-0"] == [f"flood-{n}" for n in range(20)]
    finally:
        await writer.close()
    messages = await read_topic(kafka_broker.bootstrap, kafka_topic, expected=20 * 200 + 1)
    assert len({m.key for m in messages}) == 20 * 200 + 1


async def test_a_tenant_in_a_lane_of_its_own_cannot_fill_the_writers_mailbox(make_settings) -> None:  # type: ignore[no-untyped-def]
    writer = KafkaWriter(make_settings(writer_mailbox_size=4))
    writer._task = asyncio.ensure_future(asyncio.sleep(3600))  # a writer that takes nothing
    try:
        records = [OutboundRecord(key=b"k", value=b"v", headers=[])]
        for _ in range(3):
            writer.submit(records, "flood")
        with pytest.raises(MailboxFull):
            writer.submit(records, "flood")
        writer.submit(records, SHARED_LANE)  # the last quarter is kept for the others
        assert writer.mailbox_depth == 4
    finally:
        writer._task.cancel()
