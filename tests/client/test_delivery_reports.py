"""Delivery reports against a real mlgate and a real broker: accepted, rejected with the
server's reason, duplicates, and what lands in the topic."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from mlgate_client import Outcome, Producer, SyncProducer
from mlgate_client.errors import Unauthorized

from tests.client.landing import (
    FEATURES,
    StartKafkaService,
    assert_landed_exactly_once,
    reports,
)
from tests.client.scripted import Scripted, accepted


async def test_every_record_lands_once_and_reports_accepted(kafka_service: StartKafkaService) -> None:
    mlgate = kafka_service()
    async with Producer(mlgate.url, "client-test", max_records=64, linger_ms=1) as producer:
        futures = [
            await producer.send(FEATURES, label=float(i % 2), metadata={"n": i, "device": "d1"})
            for i in range(500)
        ]
    delivered = await reports(futures)
    assert {d.outcome for d in delivered} == {Outcome.ACCEPTED}
    assert len({d.record_id for d in delivered}) == 500
    assert_landed_exactly_once(await mlgate.landed(expected=500), delivered)
    assert producer.stats.accepted == 500 and producer.stats.batches >= 8


async def test_rejected_records_are_reported_with_the_servers_reason(
    kafka_service: StartKafkaService,
) -> None:
    mlgate = kafka_service()
    async with Producer(mlgate.url, "client-test", linger_ms=1) as producer:
        good = await producer.send(FEATURES, record_id="good-1")
        short = await producer.send([1.0, 2.0], record_id="short-1")
        nan = await producer.send([1.0, float("nan"), 3.0, 4.0], record_id="nan-1")
    assert (await good).outcome is Outcome.ACCEPTED
    for future, record_id in ((short, "short-1"), (nan, "nan-1")):
        report = await future
        assert report.outcome is Outcome.REJECTED and report.record_id == record_id
        assert report.reason
    assert "dimension" in ((await short).reason or "")
    assert producer.stats.rejected == 2
    assert_landed_exactly_once(await mlgate.landed(expected=1), [await good])


async def test_a_batch_with_every_record_rejected_reports_each_one(
    kafka_service: StartKafkaService,
) -> None:
    mlgate = kafka_service()
    async with Producer(mlgate.url, "client-test", linger_ms=1) as producer:
        futures = [await producer.send([1.0] * 3, record_id=f"bad-{i}") for i in range(3)]
    delivered = await reports(futures)
    assert [d.outcome for d in delivered] == [Outcome.REJECTED] * 3
    assert all(d.reason and "dimension" in d.reason for d in delivered)


async def test_record_ids_sent_again_are_reported_duplicate(kafka_service: StartKafkaService) -> None:
    mlgate = kafka_service()
    ids = [f"again-{i}" for i in range(20)]
    for expected in (Outcome.ACCEPTED, Outcome.DUPLICATE):
        async with Producer(mlgate.url, "client-test", linger_ms=1) as producer:
            futures = [await producer.send(FEATURES, record_id=i) for i in ids]
        assert {d.outcome for d in await reports(futures)} == {expected}
    assert await mlgate.landed(expected=20) == {i: 1 for i in ids}


async def test_api_key_comes_from_the_environment(
    kafka_service: StartKafkaService, api_keys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = api_keys.create(scopes="ingest")
    mlgate = kafka_service(MLGATE_AUTH_DISABLED="false", MLGATE_KEYS_FILE=str(api_keys.path))
    monkeypatch.setenv("MLGATE_API_KEY", key)
    async with Producer(mlgate.url, "client-test", linger_ms=1) as producer:
        report = await (await producer.send(FEATURES))
    assert report.outcome is Outcome.ACCEPTED


async def test_a_refused_key_fails_the_records_without_retrying(
    kafka_service: StartKafkaService, api_keys: Any
) -> None:
    api_keys.create()
    mlgate = kafka_service(MLGATE_AUTH_DISABLED="false", MLGATE_KEYS_FILE=str(api_keys.path))
    async with Producer(mlgate.url, "client-test", api_key="not-a-key", linger_ms=1) as producer:
        future = await producer.send(FEATURES)
    with pytest.raises(Unauthorized) as raised:
        await future
    assert raised.value.problem["status"] == 401
    assert producer.stats.retries == 0 and producer.stats.failed == 1


def test_sync_producer_delivers_from_a_thread(kafka_service: StartKafkaService) -> None:
    mlgate = kafka_service()
    with SyncProducer(mlgate.url, "client-test", linger_ms=1) as producer:
        futures = [producer.send(FEATURES, label=1.0) for _ in range(50)]
        producer.flush()
        assert all(f.done() for f in futures)
    assert {f.result().outcome for f in futures} == {Outcome.ACCEPTED}


async def test_a_sync_producer_sending_from_its_own_callback_is_told_so_not_hung(
    scripted: Scripted,
) -> None:
    """A review: ``on_delivery`` runs on the producer's thread, and a send from it waited
    on the loop it blocked, for ever."""
    scripted.script = [accepted]
    raised: list[BaseException] = []

    def resend(record_id: str, result: object) -> None:
        for call in (lambda: holder[0].send(FEATURES), holder[0].close):
            try:
                call()
            except RuntimeError as exc:
                raised.append(exc)

    holder: list[SyncProducer] = []

    def produce() -> None:
        with SyncProducer(scripted.url, "client-test", linger_ms=1, on_delivery=resend) as producer:
            holder.append(producer)
            producer.send(FEATURES)
            producer.flush()

    await asyncio.wait_for(asyncio.to_thread(produce), 10)
    assert len(raised) == 2 and all("on_delivery" in str(exc) for exc in raised)
