"""A body that arrives fast and then stops is answered 408 once ``body_timeout_s``
passes without a byte: its average rate alone let a client that sent 8 MB at once hold
the request ~280 s. Raw sockets, to stop sending mid-body."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from mlgate.config import Settings
from tests.conftest import AppClientFactory

Client = TestClient[web.Request, web.Application]
SENT = 200 * 1024
# A guard against a hang, not a measurement: the idle bound is 0.5 s; the average rate
# alone would wait 0.5 + 200 KB / 1 KB/s, over three minutes.
GUARD_S = 10


@pytest.fixture
async def client(app_client: AppClientFactory, make_settings: Callable[..., Settings]) -> Client:
    return await app_client(
        make_settings(feature_dims=(4,), body_timeout_s=0.5, body_min_rate_bytes=1024)
    )


async def answer_after_stall(client: Client, framing: str, body: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            "POST /api/v2/ingest HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"{framing}\r\n\r\n".encode()
            + body
        )
        await writer.drain()  # then nothing more
        async with asyncio.timeout(GUARD_S):
            return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()


async def test_a_known_length_body_that_stalls_after_a_burst_is_408(client: Client) -> None:
    head = await answer_after_stall(
        client, f"Content-Length: {SENT + 100 * 1024}", b'{"source": "s", "records": [' + b" " * SENT
    )
    assert head.startswith(b"HTTP/1.1 408")
    assert b"Connection: close" in head


async def test_a_chunked_body_that_stalls_after_a_burst_is_408(client: Client) -> None:
    chunk = b'{"source": "s", "records": [' + b" " * SENT
    head = await answer_after_stall(
        client, "Transfer-Encoding: chunked", b"%x\r\n%s\r\n" % (len(chunk), chunk)
    )
    assert head.startswith(b"HTTP/1.1 408")


async def test_the_408_of_a_body_that_paused_says_it_paused_not_that_it_was_slow(
    client: Client,
) -> None:
    """A review: the pause bound's 408 blamed the rate ("slower than 1024 bytes/s") for
    a body that had averaged ~180 KB/s before it stopped."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            "POST /api/v2/ingest HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {SENT + 100 * 1024}\r\n\r\n".encode()
            + b'{"source": "s", "records": [' + b" " * SENT
        )
        await writer.drain()
        async with asyncio.timeout(GUARD_S):
            answer = await reader.readuntil(b"\r\n\r\n")
            length = int(answer.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            answer += await reader.readexactly(length)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"paused longer than 0.5 s" in answer
    assert b"slower than" not in answer
