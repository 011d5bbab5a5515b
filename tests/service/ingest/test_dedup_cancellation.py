"""A write whose caller is cancelled after it was handed to the sink (a client gone
away) still lands, so its record ids must count as written, not be released for a
retry to write them a second time."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from mlgate.service.http.codec import Format
from mlgate.service.ingest.pipeline import Written
from mlgate.service.state import INGEST_PIPELINE, RECORD_SINK
from tests.conftest import AppClientFactory


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

    first = asyncio.create_task(pipeline.write("t", batch, "track-1", items))
    await asyncio.sleep(0)  # it claims "a" and "b" and hands the records to the sink
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first

    retry = await pipeline.write("t", batch, "track-2", items)
    assert retry == Written(accepted=0, duplicates=2)
    assert client.app[RECORD_SINK].next_offset == 2

