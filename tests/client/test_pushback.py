"""Exactly once while mlgate pushes back: 503 from a full writer mailbox, 429 from a low
rate limit, and a restart of the server mid-run (idempotency and dedup in Redis, as
behind a balancer)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from mlgate_client import Delivery, Producer, RetryPolicy

from tests.client.landing import (
    FEATURES,
    StartKafkaService,
    assert_landed_exactly_once,
    reports,
)

RECORDS = 600
FAST_RETRIES = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.5, timeout_s=60)

PUSHBACK = {
    "503": {  # one request may wait for the writer, which takes one at a time
        "MLGATE_WRITER_MAILBOX_SIZE": "1",
        "MLGATE_WRITER_MAX_IN_FLIGHT": "1",
        "MLGATE_WRITER_MAX_BATCH_RECORDS": "30",
    },
    "429": {"MLGATE_RATE_LIMIT_KEY_RATE": "20", "MLGATE_RATE_LIMIT_KEY_BURST": "4"},
}


@pytest.mark.parametrize("cause", sorted(PUSHBACK))
async def test_every_record_lands_once_while_the_server_pushes_back(
    kafka_service: StartKafkaService, cause: str
) -> None:
    mlgate = kafka_service(**PUSHBACK[cause])
    async with Producer(
        mlgate.url, "client-test", max_records=30, max_in_flight=8, retry=FAST_RETRIES
    ) as producer:
        futures = [await producer.send(FEATURES, metadata={"n": i}) for i in range(RECORDS)]
    delivered = await reports(futures)
    assert all(d.delivered for d in delivered)
    assert producer.stats.retries_by_cause[cause] > 0
    assert max(d.attempts for d in delivered) > 1
    assert_landed_exactly_once(await mlgate.landed(expected=RECORDS), delivered)


async def test_every_record_lands_once_across_a_server_restart(
    kafka_service: StartKafkaService, redis_server: Any
) -> None:
    mlgate = kafka_service(
        REDIS_URL=f"redis://127.0.0.1:{redis_server.port}", MLGATE_IDEMPOTENCY_LOCK_S="2"
    )
    flowing, restarted = asyncio.Event(), asyncio.Event()

    async def produce() -> list[asyncio.Future[Delivery]]:
        """A steady stream from before the stop until well after the start."""
        futures: list[asyncio.Future[Delivery]] = []
        after_restart = 0
        async with Producer(
            mlgate.url, "client-test", max_records=20, linger_ms=1, retry=FAST_RETRIES
        ) as producer:
            while after_restart < 200:
                futures.append(await producer.send(FEATURES, metadata={"n": len(futures)}))
                if len(futures) == 100:
                    flowing.set()
                after_restart += restarted.is_set()
                await asyncio.sleep(0.001)
        assert producer.stats.retries_by_cause["connection"] > 0
        return futures

    producing = asyncio.create_task(produce())
    await flowing.wait()
    await asyncio.to_thread(mlgate.service.stop)  # SIGTERM: in-flight requests finish
    await asyncio.to_thread(mlgate.service.start)
    restarted.set()
    futures = await producing
    delivered = await reports(futures)
    assert all(d.delivered for d in delivered)
    assert_landed_exactly_once(await mlgate.landed(expected=len(futures)), delivered)
