"""``POST /api/v2/ingest/stream`` within the held-values bound: a stream's records count
against it as they are decoded (not only when a chunk of 1000 is written), a stream is
refused as a batch is, and a record of a dimension not allowed is not kept."""

from __future__ import annotations

import asyncio
import re
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.test_utils import TestClient

from mlgate.config import Settings
from mlgate.service.ingest.pipeline import IngestPipeline
from mlgate.service.state import INGEST_PIPELINE
from mlgate.workers.sinks.records import OutboundRecord
from tests.conftest import AppClientFactory
from tests.service.ingest.sinks import WrappedSink

Client = TestClient[web.Request, web.Application]
OPEN: dict[str, Any] = {"auth_disabled": True, "rate_limits_enabled": False}
STREAM = "/api/v2/ingest/stream?source=s"
NDJSON = {"Content-Type": "application/x-ndjson"}
MSGPACK = {"Content-Type": "application/msgpack"}


class GatedSink(WrappedSink):
    """Writes wait for ``gate`` (open at first); ``written`` counts what got through."""

    def __init__(self, sink: Any) -> None:
        super().__init__(sink)
        self.gate = asyncio.Event()
        self.gate.set()
        self.written: list[int] = []
        self.wrote = asyncio.Event()

    async def write(self, records: list[OutboundRecord], lane: str = "", tenants=()) -> None:
        await self.gate.wait()
        await super().write(records)
        self.written.append(len(records))
        self.wrote.set()


def _lines(first: int, count: int, dims: int) -> bytes:
    return b"".join(
        msgspec.json.encode({"record_id": f"r{first + i}", "features": [0.5] * dims}) + b"\n"
        for i in range(count)
    )


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


async def _client(
    app_client: AppClientFactory, make_settings: Callable[..., Settings], **overrides: Any
) -> tuple[Client, IngestPipeline, GatedSink]:
    client = await app_client(make_settings(**{**OPEN, **overrides}))
    pipeline = client.app[INGEST_PIPELINE]
    sink = pipeline._sink = GatedSink(pipeline._sink)
    return client, pipeline, sink


async def test_an_idle_streams_decoded_records_are_held_before_its_chunk_is_full(
    app_client: AppClientFactory, make_settings: Callable[..., Settings]
) -> None:
    client, pipeline, _ = await _client(app_client, make_settings, feature_dims=(4096,))
    go_on = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield _lines(0, 3, 4096)
        await go_on.wait()  # the client pauses: its records wait, decoded

    posted = asyncio.ensure_future(client.post(STREAM, data=body(), headers=NDJSON))
    held = await _until(lambda: pipeline.held_values == 3 * 4096)
    go_on.set()
    response = await posted
    assert held, f"held {pipeline.held_values} values for 3 decoded records of 4096"
    assert response.status == 202, await response.text()
    assert (await response.json())["records_accepted"] == 3
    assert pipeline.held_values == 0


async def test_a_stream_is_refused_before_its_body_is_read_while_the_bound_is_full(
    app_client: AppClientFactory, make_settings: Callable[..., Settings]
) -> None:
    client, pipeline, sink = await _client(
        app_client, make_settings, feature_dims=(4,), ingest_max_held_values=4000
    )
    sink.gate.clear()  # Kafka frozen: the batch stays held
    batch = {"source": "s", "records": [{"features": [1.0, 2.0, 3.0, 4.0]}] * 1000}
    held = asyncio.ensure_future(client.post("/api/v2/ingest", json=batch))
    assert await _until(lambda: pipeline.held_values == 4000)

    async def endless() -> AsyncIterator[bytes]:
        yield _lines(0, 10, 4)
        await asyncio.Event().wait()  # never ends: only a refusal answers it

    response = await asyncio.wait_for(client.post(STREAM, data=endless(), headers=NDJSON), 5)
    assert response.status == 503 and response.headers["Retry-After"].isdigit()
    assert "feature values" in (await response.json(content_type=None))["detail"]
    sink.gate.set()
    assert (await held).status == 202


async def test_a_stream_past_the_bound_is_503_saying_which_records_were_written(
    app_client: AppClientFactory, make_settings: Callable[..., Settings]
) -> None:
    """Its first chunk is written (a stream holding a sixteenth of the bound writes its
    chunk early), then a batch holds the whole bound: the stream's next records are
    refused with the 503 a batch gets, saying where its written part ends."""
    client, pipeline, sink = await _client(
        app_client, make_settings, feature_dims=(4,), ingest_max_held_values=4000
    )
    go_on = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield _lines(0, 100, 4)
        await go_on.wait()
        yield _lines(100, 200, 4)

    posted = asyncio.ensure_future(client.post(STREAM, data=body(), headers=NDJSON))
    first_written = await _until(lambda: bool(sink.written))
    sink.gate.clear()
    batch = {"source": "s", "records": [{"features": [1.0, 2.0, 3.0, 4.0]}] * 1000}
    held = asyncio.ensure_future(client.post("/api/v2/ingest", json=batch))
    assert await _until(lambda: pipeline.held_values >= 4000)
    go_on.set()
    response = await posted
    sink.gate.set()
    assert (await held).status == 202
    assert first_written, "the stream wrote nothing while it held its first records"
    assert response.status == 503 and response.headers["Retry-After"].isdigit()
    detail = (await response.json(content_type=None))["detail"]
    written = sink.written[0]
    assert written < 100
    assert f"The first {written} records accepted from this stream were written" in detail
    assert f"no record from index {written} on was written" in detail
    assert pipeline.held_values == 0


async def _traced_while_waiting(
    client: Any, pipeline: Any, parts: list[bytes], headers: dict[str, str]
) -> tuple[int, Any]:
    """Post a stream of ``parts`` that then waits; the bytes Python allocated and still
    holds once its records are held and it waits, and the answer once it ends."""
    go_on = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part
        await go_on.wait()

    tracemalloc.start()
    try:
        posted = asyncio.ensure_future(client.post(STREAM, data=body(), headers=headers))
        await _until(lambda: pipeline.held_values > 0)
        await asyncio.sleep(0.05)
        grown = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    go_on.set()
    return grown, await posted


async def test_records_of_a_dimension_not_allowed_are_not_kept_while_the_stream_waits(
    app_client: AppClientFactory, make_settings: Callable[..., Settings]
) -> None:
    client, pipeline, _ = await _client(app_client, make_settings, feature_dims=(4096,))
    wrong = _lines(0, 100, 4095)  # ~13 MB as Python floats, were they kept
    # The last record is held at once: all before it were decoded.
    grown, response = await _traced_while_waiting(
        client, pipeline, [wrong, _lines(100, 1, 4096)], NDJSON
    )
    assert grown < 4 * 1024 * 1024, f"{grown} bytes traced while the stream waited"
    assert response.status == 202, await response.text()
    answer = await response.json()
    assert (answer["records_accepted"], answer["records_rejected"]) == (1, 100)
    # Rejected in the words a batch gets.
    batch = {"source": "s", "records": [{"features": [0.5] * 4095}]}
    problem = await (await client.post("/api/v2/ingest", json=batch)).json(content_type=None)
    assert answer["errors"][0]["error"] == problem["errors"][0]["msg"]
    assert re.match(r"features has 4095 values", answer["errors"][0]["error"])


async def test_a_msgpack_records_decoded_value_is_not_kept_while_the_stream_waits(
    app_client: AppClientFactory, make_settings: Callable[..., Settings]
) -> None:
    """A record of 400,000 empty arrays (400 kB; ~25 MB decoded) is rejected, and
    nothing of it stays referenced while the stream waits for more."""
    client, pipeline, _ = await _client(app_client, make_settings, feature_dims=(4096,))
    bomb = msgspec.msgpack.encode({"features": [[[]] * 4000] * 100})
    valid = msgspec.msgpack.encode({"record_id": "v", "features": [0.5] * 4096})
    # The bomb is the last record before the stream waits; both are decoded in the
    # turn of the event loop that holds the valid record.
    grown, response = await _traced_while_waiting(client, pipeline, [valid + bomb], MSGPACK)
    assert grown < 4 * 1024 * 1024, f"{grown} bytes traced while the stream waited"
    assert response.status == 202, await response.text()
    answer = await response.json()
    assert (answer["records_accepted"], answer["records_rejected"]) == (1, 1)
