"""Ingests hold their decoded records until they are durable: the feature values they
hold at once are bounded (``MLGATE_INGEST_MAX_HELD_VALUES``), past it a new ingest is
503 at once, and one request always fits."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
import structlog.testing

from mlgate.service.http.codec import Format
from mlgate.service.http.errors import ValidationFailed
from mlgate.service.ingest import pipeline as pipeline_module
from mlgate.service.ingest.pipeline import IngestPipeline
from mlgate.service.protection.audit import Caller
from mlgate.service.routes.ingest import STREAM_CHUNK_SHARE, ingest_batch
from mlgate.service.state import (
    INGEST_PIPELINE,
    METRICS,
    RECORD_DEDUP,
    RECORD_SINK,
    RECORD_VALIDATOR,
)
from mlgate.workers.errors import MailboxFull
from mlgate.workers.sinks.records import OutboundRecord
from tests.conftest import AppClientFactory
from tests.service.ingest.sinks import WrappedSink

CALLER = Caller("t", "k", "POST /api/v2/ingest", "rid")
PATH = "/api/v2/ingest"


class GatedSink(WrappedSink):
    """Writes wait for ``gate``: the records stay held meanwhile, as while Kafka does
    not answer."""

    def __init__(self, sink: Any) -> None:
        super().__init__(sink)
        self.gate = asyncio.Event()

    async def write(self, records: list[OutboundRecord], lane: str = "", tenants=()) -> None:
        await self.gate.wait()
        await super().write(records)


def body(first: int, count: int) -> bytes:
    records = [{"record_id": f"r{first + i}", "features": [1.0, 2.0, 3.0, 4.0]} for i in range(count)]
    return msgspec.json.encode({"source": "s", "records": records})


@pytest.fixture
async def gated(app_client: AppClientFactory, settings_for: Any) -> tuple[IngestPipeline, GatedSink]:
    app = (await app_client(settings_for())).app
    sink = GatedSink(app[RECORD_SINK])
    pipeline = IngestPipeline(
        app[RECORD_VALIDATOR], app[RECORD_DEDUP], sink, app[METRICS], max_held_values=40
    )
    return pipeline, sink


async def test_an_ingest_past_the_held_values_is_refused_at_once(
    gated: tuple[IngestPipeline, GatedSink],
) -> None:
    pipeline, sink = gated
    waiting = asyncio.ensure_future(ingest_batch(pipeline, body(0, 8), Format.JSON, CALLER))  # 32 values
    await asyncio.sleep(0)  # decoded, held, waiting for the sink
    with structlog.testing.capture_logs() as logs, pytest.raises(MailboxFull):
        await ingest_batch(pipeline, body(100, 3), Format.JSON, CALLER)  # 12 more: past 40
    [refused] = [entry for entry in logs if entry.get("outcome", "").startswith("refused")]
    assert refused["event"] == "ingest" and refused["request_id"] == "rid"
    sink.gate.set()
    assert (await waiting).records_accepted == 8
    # Released once answered: the same request now fits.
    assert (await ingest_batch(pipeline, body(100, 3), Format.JSON, CALLER)).records_accepted == 3


async def test_a_request_larger_than_the_bound_fits_when_nothing_else_is_held(
    gated: tuple[IngestPipeline, GatedSink],
) -> None:
    pipeline, sink = gated
    sink.gate.set()
    answer = await ingest_batch(pipeline, body(0, 20), Format.JSON, CALLER)  # 80 values
    assert answer.records_accepted == 20


async def test_a_rejected_ingest_releases_what_it_held(
    gated: tuple[IngestPipeline, GatedSink],
) -> None:
    pipeline, sink = gated
    sink.gate.set()
    bad = msgspec.json.encode({"source": "s", "records": [{"features": [1.0, 2.0, 3.0]}] * 9})
    with pytest.raises(ValidationFailed):  # every record of the wrong width: 422
        await ingest_batch(pipeline, bad, Format.JSON, CALLER)
    # 40 values fit only if the 27 of the rejected batch were released.
    assert (await ingest_batch(pipeline, body(0, 10), Format.JSON, CALLER)).records_accepted == 10


def _caller(tenant: str) -> Caller:
    return Caller(tenant, "k", "POST /api/v2/ingest", "rid")


async def test_a_tenant_refused_room_gets_it_once_the_flood_is_held_to_its_share(
    gated: tuple[IngestPipeline, GatedSink],
) -> None:
    pipeline, sink = gated
    flood, calm = _caller("flood"), _caller("calm")
    floods = [  # 36 of the 40 values, held while Kafka is slow
        asyncio.ensure_future(ingest_batch(pipeline, body(10 * n, 3), Format.JSON, flood))
        for n in range(3)
    ]
    await asyncio.sleep(0)
    with pytest.raises(MailboxFull):  # no room: calm now shares the bound
        await ingest_batch(pipeline, body(100, 2), Format.JSON, calm)
    with pytest.raises(MailboxFull, match="its share of 20"):  # flood holds 36 of 40
        await ingest_batch(pipeline, body(200, 1), Format.JSON, flood)
    sink.gate.set()
    await asyncio.gather(*floods)
    sink.gate.clear()
    # The flood again: past its half (20) only into room calm did not ask for (its 8).
    held = []
    for first, records in ((300, 4), (310, 2), (320, 1)):  # 16 + 8 + 4: 28 <= 40 - 8
        held.append(asyncio.ensure_future(ingest_batch(pipeline, body(first, records), Format.JSON, flood)))
        await asyncio.sleep(0)
    with pytest.raises(MailboxFull, match="its share"):  # 36 would take calm's room
        await ingest_batch(pipeline, body(400, 2), Format.JSON, flood)
    held.append(asyncio.ensure_future(ingest_batch(pipeline, body(500, 2), Format.JSON, calm)))
    await asyncio.sleep(0)
    sink.gate.set()
    assert [answer.records_accepted for answer in await asyncio.gather(*held)] == [4, 2, 1, 2]


async def test_a_tenant_alone_may_hold_the_whole_bound(
    gated: tuple[IngestPipeline, GatedSink],
) -> None:
    pipeline, sink = gated
    alone = _caller("alone")
    held = [
        asyncio.ensure_future(ingest_batch(pipeline, body(10 * n, 3), Format.JSON, alone))
        for n in range(3)
    ]  # 36 of 40 values
    await asyncio.sleep(0)
    sink.gate.set()
    assert [answer.records_accepted for answer in await asyncio.gather(*held)] == [3, 3, 3]



async def _flood_refused_calm(
    pipeline: IngestPipeline,
) -> list[asyncio.Future[Any]]:
    """Flood holds 36 of 40 values (its writes waiting on the sink); calm was refused."""
    floods = [
        asyncio.ensure_future(ingest_batch(pipeline, body(10 * n, 3), Format.JSON, _caller("flood")))
        for n in range(3)
    ]
    await asyncio.sleep(0)
    with pytest.raises(MailboxFull):
        await ingest_batch(pipeline, body(100, 2), Format.JSON, _caller("calm"))
    return floods


async def test_an_ingest_past_its_tenants_share_is_refused_before_its_body_is_decoded(
    gated: tuple[IngestPipeline, GatedSink],
) -> None:
    pipeline, sink = gated
    floods = await _flood_refused_calm(pipeline)
    # Not even JSON: decoded, it would be a 400; refused first, it is a 503.
    with pytest.raises(MailboxFull, match="its share"):
        await ingest_batch(pipeline, b"not a body", Format.JSON, _caller("flood"))
    metrics = pipeline._metrics
    assert metrics.ingest_refused.labels("tenant_share")._value.get() == 1
    assert metrics.ingest_refused.labels("held_values")._value.get() == 1  # calm's
    sink.gate.set()
    await asyncio.gather(*floods)


async def test_a_refused_tenant_caps_the_others_only_for_a_while_after_its_refusal(
    gated: tuple[IngestPipeline, GatedSink], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: refreshed by each of its requests, a tenant refused once kept the
    others at their share for as long as it sent anything, room or not."""
    monkeypatch.setattr(pipeline_module, "WANTING_S", 0.1)
    pipeline, sink = gated
    floods = await _flood_refused_calm(pipeline)
    sink.gate.set()
    await asyncio.gather(*floods)
    sink.gate.clear()
    held = [asyncio.ensure_future(ingest_batch(pipeline, body(300, 4), Format.JSON, _caller("flood")))]
    await asyncio.sleep(0)
    with pytest.raises(MailboxFull, match="its share"):  # calm refused just now: 36 > 40 - 8
        await ingest_batch(pipeline, body(400, 5), Format.JSON, _caller("flood"))
    for n in range(3):  # calm goes on posting, admitted, past WANTING_S
        sink.gate.set()
        await ingest_batch(pipeline, body(200 + n, 1), Format.JSON, _caller("calm"))
        sink.gate.clear()
        await asyncio.sleep(0.05)
    held.append(asyncio.ensure_future(ingest_batch(pipeline, body(400, 5), Format.JSON, _caller("flood"))))
    await asyncio.sleep(0)
    sink.gate.set()
    assert [answer.records_accepted for answer in await asyncio.gather(*held)] == [4, 5]


async def test_a_streams_chunks_count_against_the_held_values_too(
    app_client: AppClientFactory, settings_for: Any
) -> None:
    """A stream writes its chunk once it holds a share of the bound
    (``STREAM_CHUNK_SHARE``), so that many streams fit it; past it, the next is 503."""
    client = await app_client(settings_for(ingest_max_held_values=4000))
    pipeline = client.app[INGEST_PIPELINE]
    sink = pipeline._sink = GatedSink(pipeline._sink)  # Kafka frozen: chunks stay held

    def stream(first: int) -> bytes:
        lines = (
            msgspec.json.encode({"record_id": f"s{first + i}", "features": [1.0, 2.0, 3.0, 4.0]})
            for i in range(1000)
        )
        return b"\n".join(lines) + b"\n"

    headers = {"Content-Type": "application/x-ndjson"}
    waiting: list[asyncio.Future[Any]] = []
    refused = None
    for n in range(STREAM_CHUNK_SHARE + 1):
        before = pipeline.held_values
        posted = asyncio.ensure_future(
            client.post(f"{PATH}/stream?source=s", data=stream(1000 * n), headers=headers)
        )
        for _ in range(500):  # until its first chunk is held, waiting for the sink
            if pipeline.held_values > before or posted.done():
                break
            await asyncio.sleep(0.01)
        if posted.done():
            refused = await posted
            break
        waiting.append(posted)
    assert refused is not None and refused.status == 503
    assert "feature values" in (await refused.json())["detail"]
    assert 1 < len(waiting) <= STREAM_CHUNK_SHARE
    assert pipeline.held_values <= 4000
    sink.gate.set()
    assert [(await posted).status for posted in waiting] == [202] * len(waiting)
