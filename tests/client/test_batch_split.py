"""A batch the server finds too large for its limits (its body, or its number of
records: a producer configured past the server's) goes again in halves until it fits:
every record delivered once, none failed for the producer's settings."""

from __future__ import annotations

import pytest
from mlgate_client import Outcome, Producer
from mlgate_client.errors import PayloadTooLarge

from tests.client.conftest import StartKafkaService
from tests.client.landing import FEATURES, assert_landed_exactly_once, reports
from tests.client.scripted import Scripted, problem


async def test_a_batch_past_the_servers_record_limit_is_delivered_in_halves(
    kafka_service: StartKafkaService,
) -> None:
    mlgate = kafka_service(MLGATE_MAX_BATCH_RECORDS="10")
    async with Producer(mlgate.url, "s", max_records=50, linger_ms=60_000) as producer:
        futures = [await producer.send(FEATURES) for _ in range(50)]
    delivered = await reports(futures)
    assert {report.outcome for report in delivered} == {Outcome.ACCEPTED}
    assert producer.stats.accepted == 50 and producer.stats.failed == 0
    assert producer.stats.batches == 1 + 2 + 4 + 8  # 50, 25s, 12-13s, 6-7s
    assert_landed_exactly_once(await mlgate.landed(50), delivered)


async def test_a_body_past_the_servers_limit_is_delivered_in_halves(
    kafka_service: StartKafkaService,
) -> None:
    mlgate = kafka_service(MLGATE_MAX_BODY_BYTES="2048")
    async with Producer(mlgate.url, "s", max_records=100, linger_ms=60_000) as producer:
        futures = [await producer.send(FEATURES) for _ in range(100)]  # ~70 bytes each
    delivered = await reports(futures)
    assert {report.outcome for report in delivered} == {Outcome.ACCEPTED}
    assert producer.stats.batches > 1
    assert_landed_exactly_once(await mlgate.landed(100), delivered)


async def test_a_single_record_too_large_fails_with_the_servers_answer(scripted: Scripted) -> None:
    scripted.script = [problem(413)]
    async with Producer(scripted.url, "s") as producer:
        future = await producer.send(FEATURES)
        with pytest.raises(PayloadTooLarge):
            await future
    assert len(scripted.seen) == 1  # never split below one record
