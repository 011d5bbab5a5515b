"""While mlgate is down the producer holds at most ``max_buffer_bytes``: ``send`` waits
(or raises ``BufferFull``), memory stays flat, and everything lands once it is back."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator

import pytest
from mlgate_client import BufferFull, Delivery, Producer, RetryPolicy

from tests.client.landing import StartKafkaService, assert_landed_exactly_once, reports

DIMS = 512
ROW = [0.25] * DIMS
RECORDS = 3000  # about 14 MB encoded: seven times the buffer
BUFFER = 2 * 1024 * 1024
RETRIES = RetryPolicy(initial_backoff_s=0.02, max_backoff_s=0.2, timeout_s=60)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RetryWatch(logging.Handler):
    """Wakes ``until`` on every retry the producer logs."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.retried = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "mlgate_client.retry":
            self.retried.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self.retried.clear()
            await self.retried.wait()


@pytest.fixture
def retries_seen(caplog: pytest.LogCaptureFixture) -> Iterator[RetryWatch]:
    caplog.set_level(logging.INFO, logger="mlgate_client")
    watch = RetryWatch()
    logger = logging.getLogger("mlgate_client")
    logger.addHandler(watch)
    yield watch
    logger.removeHandler(watch)


async def test_send_waits_while_the_server_is_down_and_memory_stays_flat(
    kafka_service: StartKafkaService, retries_seen: RetryWatch
) -> None:
    mlgate = kafka_service(MLGATE_FEATURE_DIMS=str(DIMS))
    await asyncio.to_thread(mlgate.service.stop)
    producer = Producer(
        mlgate.url, "client-test", max_records=100, max_bytes=256 * 1024,
        max_buffer_bytes=BUFFER, retry=RETRIES,
    )

    async def produce() -> list[asyncio.Future[Delivery]]:
        return [await producer.send(ROW, metadata={"n": i}) for i in range(RECORDS)]

    producing = asyncio.create_task(produce())
    record_bytes = DIMS * 9 + 100  # float64 features in msgpack, with room for the rest
    await retries_seen.until(lambda: producer.buffered_bytes + record_bytes > BUFFER and producer.stats.retries > 0)
    held, sent, rss = producer.buffered_bytes, producer.stats.sent, rss_bytes()
    retries = producer.stats.retries
    await retries_seen.until(lambda: producer.stats.retries >= retries + 20)  # the senders keep trying

    assert not producing.done()
    assert producer.stats.sent == sent  # send is waiting, not buffering more
    assert producer.buffered_bytes == held <= BUFFER
    assert rss_bytes() - rss < 4 * 1024 * 1024

    await asyncio.to_thread(mlgate.service.start)
    futures = await producing
    await producer.close()
    delivered = await reports(futures)
    assert len(delivered) == RECORDS and all(d.delivered for d in delivered)
    assert_landed_exactly_once(await mlgate.landed(expected=RECORDS), delivered)


async def test_send_raises_buffer_full_when_told_not_to_wait(
    kafka_service: StartKafkaService,
) -> None:
    mlgate = kafka_service(MLGATE_FEATURE_DIMS=str(DIMS))
    await asyncio.to_thread(mlgate.service.stop)
    retries = RetryPolicy(initial_backoff_s=0.02, max_backoff_s=0.05, max_attempts=3)
    async with Producer(
        mlgate.url, "client-test", max_bytes=256 * 1024, max_buffer_bytes=256 * 1024,
        block_on_full=False, retry=retries,
    ) as producer:
        futures = []
        with pytest.raises(BufferFull):
            for _ in range(RECORDS):
                futures.append(await producer.send(ROW))
        assert len(futures) * len(ROW) * 9 <= 256 * 1024
    assert producer.stats.failed == len(futures)  # three attempts, then the last error
