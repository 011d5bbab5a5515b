"""A write whose caller is cancelled after it was handed to the sink (a client gone
away) still lands, and a write may take longer than the claim's lapse: either way its
record ids must count as written, not be left for a retry to write a second time."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from mlgate.service.http.codec import Format
from mlgate.service.ingest.pipeline import IngestPipeline, Written
from mlgate.service.state import (
    INGEST_PIPELINE,
    METRICS,
    RECORD_DEDUP,
    RECORD_SINK,
    RECORD_VALIDATOR,
)
from mlgate.workers.sinks.records import OutboundRecord, RecordSink
from tests.conftest import AppClientFactory
from tests.service.ingest.sinks import WrappedSink


def _batch(ids: list[str]) -> bytes:
    records = [{"record_id": rid, "features": [1.0, 2.0, 3.0, 4.0]} for rid in ids]
    return msgspec.json.encode({"source": "s", "records": records})


async def test_a_write_cancelled_after_submission_makes_the_retry_a_duplicate(
    app_client: AppClientFactory, settings_for: Any
) -> None:
    client = await app_client(settings_for())
    pipeline = client.app[INGEST_PIPELINE]
    source, items = pipeline.decode(_batch(["a", "b"]), Format.JSON)
    batch = pipeline.validate(source, items)

    first = asyncio.create_task(pipeline.write("t", batch, "track-1"))
    await asyncio.sleep(0)  # it claims "a" and "b" and hands the records to the sink
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first

    retry = await pipeline.write("t", batch, "track-2")
    assert retry == Written(accepted=0, duplicates=2)
    assert client.app[RECORD_SINK].next_offset == 2



class GatedSink(WrappedSink):
    """The app's sink behind a gate: writes wait until the test opens it (a slow Kafka)."""

    def __init__(self, sink: RecordSink) -> None:
        super().__init__(sink)
        self.gate = asyncio.Event()
        self.waiting = 0

    async def write(self, records: list[OutboundRecord], lane: str = "", tenants=()) -> None:
        self.waiting += 1
        await self.gate.wait()
        await super().write(records)


async def test_a_write_slower_than_the_lapse_keeps_its_ids_claimed(
    app_client: AppClientFactory, settings_for: Any, backend: str | None
) -> None:
    """The ids of a write still running lapsed after MLGATE_IDEMPOTENCY_LOCK_S, and a
    retry then claimed and wrote them again."""
    client = await app_client(settings_for(backend, idempotency_lock_s=1, dedup_in_flight_wait_s=30))
    app = client.app
    sink = GatedSink(app[RECORD_SINK])
    pipeline = IngestPipeline(app[RECORD_VALIDATOR], app[RECORD_DEDUP], sink, app[METRICS])
    source, items = pipeline.decode(_batch(["a", "b"]), Format.JSON)
    batch = pipeline.validate(source, items)

    first = asyncio.create_task(pipeline.write("t", batch, "track-1"))
    await asyncio.sleep(2.5)  # the write is still running after 2.5 lapses (a duration)
    retry = asyncio.create_task(pipeline.write("t", batch, "track-2"))
    await asyncio.sleep(0)  # the retry claims (or waits for) "a" and "b"
    sink.gate.set()

    assert await first == Written(accepted=2, duplicates=0)
    assert await retry == Written(accepted=0, duplicates=2)
    assert sink.waiting == 1
