"""Request bodies read whole are bounded together (``MLGATE_MAX_HELD_BODY_BYTES``), not
only each alone: a review's 200 clients sending 16 MB bodies slowly took a process to
3.4 GB. Bytes received count, not bytes declared; a body that would take them past the
bound is 503 with Retry-After; what a request held is given back when it ends, however
it ends."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from mlgate.config import Settings
from mlgate.service.state import HELD_BODIES, METRICS
from tests.conftest import AppClientFactory
from tests.support import until

Client = TestClient[web.Request, web.Application]
BOUND = 1_000_000
BATCH_HEAD = b'{"source": "s", "records": [{"features": [1, 2, 3, 4]}]'


def padded_batch(size: int) -> bytes:
    """A valid one-record batch of ``size`` bytes, blanks making up the rest."""
    return BATCH_HEAD + b" " * (size - len(BATCH_HEAD) - 1) + b"}"


@pytest.fixture
async def client(app_client: AppClientFactory, make_settings: Callable[..., Settings]) -> Client:
    return await app_client(
        make_settings(feature_dims=(4,), max_body_bytes=BOUND, max_held_body_bytes=BOUND)
    )


async def holding(client: Client, declared: int, sent: int) -> asyncio.StreamWriter:
    """A request whose body of ``declared`` bytes stops after ``sent`` of them."""
    _, writer = await asyncio.open_connection(client.host, client.port)
    head = (
        "POST /api/v2/ingest HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    writer.write(head.encode() + padded_batch(declared)[:sent])
    await writer.drain()
    if sent > 64 * 1024:
        await until(lambda: client.app[HELD_BODIES].held == sent)
    return writer


async def post(client: Client, body: object) -> web.Response:
    return await client.post("/api/v2/ingest", data=body, headers={"Content-Type": "application/json"})


async def test_a_body_past_the_bound_of_all_held_is_503(client: Client) -> None:
    writer = await holding(client, 900_000, 800_000)
    try:
        refused = await post(client, padded_batch(300_000))
        assert refused.status == 503
        assert refused.headers["Retry-After"].isdigit()
        assert refused.headers["Connection"] == "close"
        assert (await refused.json(content_type=None))["type"] == "/problems/overloaded"
    finally:
        writer.close()
    await until(lambda: client.app[HELD_BODIES].held == 0)  # the stalled one ended: given back
    taken = await post(client, padded_batch(300_000))
    assert taken.status == 202, await taken.text()
    assert client.app[HELD_BODIES].held == 0


async def test_a_head_declaring_a_body_it_does_not_send_holds_nothing(client: Client) -> None:
    """A review: counted as declared, 32 heads of 16 MB sending nothing refused every
    other tenant's larger bodies for the body timeout."""
    writers = [await holding(client, BOUND, 0) for _ in range(3)]
    try:
        assert client.app[HELD_BODIES].held == 0
        taken = await post(client, padded_batch(300_000))
        assert taken.status == 202, await taken.text()
    finally:
        for writer in writers:
            writer.close()


async def test_a_chunked_body_counts_as_it_is_read_and_is_refused_once_past_the_bound(
    client: Client,
) -> None:
    writer = await holding(client, 900_000, 800_000)

    async def chunks():  # 300 KB in pieces
        body = padded_batch(300_000)
        for start in range(0, len(body), 50_000):
            yield body[start : start + 50_000]

    try:
        refused = await post(client, chunks())
        assert refused.status == 503
    finally:
        writer.close()
    await until(lambda: client.app[HELD_BODIES].held == 0)


async def test_small_bodies_are_not_held_back_by_large_ones(client: Client) -> None:
    writer = await holding(client, BOUND, BOUND - 1000)
    try:
        small = await post(client, padded_batch(10_000))
        assert small.status == 202
        metrics = client.app[METRICS]
        metrics.sample()
        assert metrics.held_body_bytes._value.get() == BOUND - 1000
    finally:
        writer.close()
