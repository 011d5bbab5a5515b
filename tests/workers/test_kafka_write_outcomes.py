"""What a failed Kafka write did: records the broker never got spill and go once;
records of a produce that timed out spill too and are counted as possibly resent."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from pathlib import Path

import pytest
from aiokafka.errors import RequestTimedOutError

from mlgate.workers.sinks.kafka_writer import (
    _REFUSED,
    _WRITTEN,
    KafkaWriteFailed,
    KafkaWriter,
    _Batch,
    _Pending,
)
from mlgate.workers.sinks.records import OutboundRecord
from mlgate.workers.telemetry import NO_TELEMETRY
from tests.support import (
    KafkaBroker,
    create_topic,
    read_topic,
    started_spilling_sink,
    wait_until_drained,
)


class _Resent(type(NO_TELEMETRY)):  # type: ignore[misc]
    def __init__(self) -> None:
        self.resent = 0

    def records_resent(self, records: int) -> None:
        self.resent += records


def _records(n: int) -> list[OutboundRecord]:
    return [OutboundRecord(key=f"r{i}".encode(), value=b"{}", headers=[]) for i in range(n)]


def _thread_states(pid: int) -> list[str]:
    tasks = Path(f"/proc/{pid}/task")
    return [(task / "stat").read_text().rsplit(")", 1)[1].split()[0] for task in tasks.iterdir()]


async def _freeze(pid: int) -> None:
    """SIGSTOP, and wait until every thread of the process has stopped (a signal is
    delivered asynchronously: a thread on another core could still answer meanwhile)."""
    os.kill(pid, signal.SIGSTOP)
    for _ in range(1000):
        if all(state == "T" for state in _thread_states(pid)):
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"process {pid} did not stop")


async def test_records_a_stopped_broker_never_got_spill_and_are_not_counted_as_resent(
    make_settings, private_kafka_broker: KafkaBroker
) -> None:
    telemetry = _Resent()
    sink, topic = await started_spilling_sink(make_settings, private_kafka_broker, telemetry, kafka_breaker_reset_s=0.2)
    try:
        private_kafka_broker.stop()  # connection refused: nothing can reach it
        await sink.write(_records(5))
        assert sink.backlog == 5
    finally:
        await sink.close()
    assert telemetry.resent == 0
    # The broker comes back empty: a new sink drains once the topic is there again.
    private_kafka_broker.start()
    await create_topic(private_kafka_broker.bootstrap, name=topic)
    sink, _ = await started_spilling_sink(make_settings, private_kafka_broker, telemetry, topic=topic, kafka_breaker_reset_s=0.2)
    try:
        await wait_until_drained(sink)
    finally:
        await sink.close()
    messages = await read_topic(private_kafka_broker.bootstrap, topic, expected=5)
    assert sorted(m.key for m in messages) == sorted(r.key for r in _records(5))


async def test_records_of_a_timed_out_produce_spill_and_count_as_resent(
    make_settings, private_kafka_broker: KafkaBroker
) -> None:
    telemetry = _Resent()
    sink, topic = await started_spilling_sink(make_settings, private_kafka_broker, telemetry, kafka_breaker_reset_s=0.2)
    assert private_kafka_broker.process is not None
    pid = private_kafka_broker.process.pid
    try:
        warm_up = OutboundRecord(key=b"warm-up", value=b"{}", headers=[])
        await sink.write([warm_up])  # connected to the partition leader
        await _freeze(pid)  # the request is sent; its answer never comes
        try:
            await sink.write(_records(5))
            assert sink.backlog == 5
        finally:
            os.kill(pid, signal.SIGCONT)
        await wait_until_drained(sink)
    finally:
        await sink.close()
    assert telemetry.resent == 5
    messages = await read_topic(private_kafka_broker.bootstrap, topic, expected=6)
    copies = Counter(m.key for m in messages if m.key != b"warm-up")
    assert set(copies) == {r.key for r in _records(5)}  # none lost
    assert sum(copies.values()) - 5 <= telemetry.resent  # every duplicate was counted


async def test_a_partly_acknowledged_request_fails_with_only_its_unacknowledged_records() -> None:
    acked, refused, unanswered, never_sent = _records(4)
    pending = _Pending(
        [acked, refused, unanswered, never_sent], asyncio.get_running_loop().create_future()
    )
    pending.batches_left = 1  # the dispatch hold
    answered, refusal, silence = _Batch(), _Batch(), _Batch()  # each handed to the producer
    answered.state, refusal.state = _WRITTEN, _REFUSED
    pending.handed += [([acked], answered), ([refused], refusal), ([unanswered], silence)]
    pending.batch_done(RequestTimedOutError())
    with pytest.raises(KafkaWriteFailed) as failed:
        await pending.future
    assert failed.value.unwritten == [refused, unanswered, never_sent]
    assert failed.value.outcome_unknown == 1


async def test_a_timed_out_produce_shows_in_the_resent_counter(
    app_client, make_settings, private_kafka_broker: KafkaBroker
) -> None:
    topic = await create_topic(private_kafka_broker.bootstrap)
    client = await app_client(
        make_settings(
            feature_dims=(4,),
            kafka_bootstrap_servers=private_kafka_broker.bootstrap,
            kafka_topic=topic,
            kafka_request_timeout_ms=500,
        )
    )
    body = {"source": "s", "records": [{"features": [1, 2, 3, 4]}]}
    assert (await client.post("/api/v2/ingest", json=body)).status == 202  # connected
    assert private_kafka_broker.process is not None
    pid = private_kafka_broker.process.pid
    await _freeze(pid)
    try:
        assert (await client.post("/api/v2/ingest", json=body)).status == 202  # spilled
    finally:
        os.kill(pid, signal.SIGCONT)
    metrics = await (await client.get("/metrics")).text()
    assert "mlgate_records_resent_total 1.0" in metrics.splitlines()


async def test_once_a_batch_is_not_taken_the_rest_of_the_round_fails_at_once_unwritten(
    make_settings, private_kafka_broker: KafkaBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frozen broker and a request of many batches: after the first batch the
    producer does not take within the request timeout, the others are not handed to
    it one timeout after another (minutes for a large request, with every write
    queued behind it waiting); they fail at once, as never written."""
    topic = await create_topic(private_kafka_broker.bootstrap)
    writer = KafkaWriter(
        make_settings(
            kafka_bootstrap_servers=private_kafka_broker.bootstrap,
            kafka_topic=topic,
            kafka_request_timeout_ms=500,
            kafka_max_batch_bytes=16_384,
        )
    )
    await writer.start()
    assert private_kafka_broker.process is not None
    pid = private_kafka_broker.process.pid
    producer = writer._running_producer
    handed: list[int] = []
    send_batch = producer.send_batch

    async def counted(*args: object, **kwargs: object) -> object:
        handed.append(1)
        return await send_batch(*args, **kwargs)

    monkeypatch.setattr(producer, "send_batch", counted)
    records = [OutboundRecord(key=f"k{i}".encode(), value=b"v" * 700, headers=[]) for i in range(900)]
    try:
        await writer.write(_records(1))  # connected to the partition leader
        handed.clear()
        await _freeze(pid)
        try:
            with pytest.raises(KafkaWriteFailed) as failed:
                await writer.write(records)  # ~40 batches of 16 KB
        finally:
            os.kill(pid, signal.SIGCONT)
    finally:
        await writer.close(drain_s=5)
    assert len(handed) <= 10  # the batches handed before one was refused, not all ~40
    unwritten = failed.value.unwritten
    assert {r.key for r in unwritten} == {r.key for r in records}  # none taken as written
    assert failed.value.outcome_unknown < len(records) // 2  # most were never sent


async def test_writes_queued_behind_a_frozen_broker_all_spill_within_two_request_timeouts(
    make_settings, private_kafka_broker: KafkaBroker
) -> None:
    """A hostile review: each round of writes failed only after a request timeout of
    its own, so the fifth write queued behind a frozen broker waited five (25 s at the
    default), every tenant's ingests refused meanwhile."""
    telemetry = _Resent()
    sink, topic = await started_spilling_sink(make_settings, private_kafka_broker, telemetry, kafka_breaker_reset_s=0.2)
    assert private_kafka_broker.process is not None
    pid = private_kafka_broker.process.pid
    timeout_s = 0.5  # the sink's kafka_request_timeout_ms

    def records(tag: int) -> list[OutboundRecord]:
        return [OutboundRecord(key=f"{tag}-{i}".encode(), value=b"x" * 200, headers=[]) for i in range(3000)]

    waited: list[float] = []

    async def write(tag: int) -> None:
        started = asyncio.get_running_loop().time()
        await sink.write(records(tag))
        waited.append(asyncio.get_running_loop().time() - started)

    try:
        await sink.write([OutboundRecord(key=b"warm-up", value=b"{}", headers=[])])
        await _freeze(pid)
        try:
            await asyncio.gather(*(write(tag) for tag in range(12)))  # six rounds' worth
        finally:
            os.kill(pid, signal.SIGCONT)
        assert max(waited) < 4 * timeout_s  # not one timeout more per round (6 x)
        await wait_until_drained(sink)
    finally:
        await sink.close()
    messages = await read_topic(private_kafka_broker.bootstrap, topic, expected=12 * 3000 + 1)
    copies = Counter(m.key for m in messages if m.key != b"warm-up")
    assert len(copies) == 12 * 3000  # none lost
    assert sum(copies.values()) - 12 * 3000 <= telemetry.resent  # every duplicate counted


@pytest.mark.parametrize("cancelled_too", [False, True], ids=["given up", "cancelled as it gave up"])
async def test_a_write_given_up_fails_as_never_sent_unless_its_task_was_cancelled(
    make_settings, cancelled_too: bool
) -> None:
    """A review: a cancellation landing in the loop turn of the give-up was swallowed,
    turned into a KafkaWriteFailed and spilled."""
    writer = KafkaWriter(make_settings())
    writer._task = asyncio.ensure_future(asyncio.sleep(3600))  # a writer that takes nothing
    caller = asyncio.ensure_future(writer.write_within(_records(1), 60))
    try:
        await asyncio.sleep(0)
        given_up = writer._mailbox._queue.by_lane[""][0]  # type: ignore[attr-defined]
        given_up.give_up()
        assert given_up.records == []  # never taken: nothing kept for it
        if cancelled_too:
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
        else:
            with pytest.raises(KafkaWriteFailed) as failed:
                await caller
            assert failed.value.never_sent and failed.value.outcome_unknown == 0
            assert len(failed.value.unwritten) == 1
    finally:
        writer._task.cancel()


async def test_a_write_given_up_at_shutdown_says_how_long_it_waited_not_how_long_it_could(
    make_settings,
) -> None:
    """A review: a write given up 4 s after SIGTERM said Kafka did not answer within 30 s."""
    writer = KafkaWriter(make_settings())
    writer._task = asyncio.ensure_future(asyncio.sleep(3600))  # a writer that takes nothing
    caller = asyncio.ensure_future(writer.write_within(_records(1), 60))
    try:
        await asyncio.sleep(0)
        assert writer.give_up_waiting() == 1
        with pytest.raises(KafkaWriteFailed) as failed:
            await caller
        assert "within 60 s" not in str(failed.value)
        assert "Kafka did not answer within 0" in str(failed.value)
    finally:
        writer._task.cancel()
