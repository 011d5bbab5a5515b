"""An answer given before an encoded body is read ends the connection, cleanly: aiohttp
would read the rest through its decoder to keep the connection, and a body that does
not decode would end it with a traceback and leave the client's next request
unanswered. An answer saying ``Connection: close`` closes the socket at once. Raw
sockets: what matters is what the connection does after the answer."""

from __future__ import annotations

import asyncio
import gzip
import logging
from collections.abc import Callable

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from mlgate.config import Settings
from mlgate.service.http.logs import quiet_client_body_errors
from tests.conftest import AppClientFactory

Client = TestClient[web.Request, web.Application]
# A guard against a hang, not a measurement: the server closes at once, where the bug
# kept the socket open for the keep-alive timeout.
CLOSE_GUARD_S = 5


@pytest.fixture
async def client(app_client: AppClientFactory, make_settings: Callable[..., Settings]) -> Client:
    quiet_client_body_errors()  # as the service's logging set-up does
    return await app_client(make_settings(feature_dims=(4,)))


async def exchange(client: Client, head: str, body: bytes) -> tuple[bytes, bytes]:
    """The answer to one request, and what the connection gives after it (b"" once
    the server closed it)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(head.encode() + body)
        await writer.drain()
        async with asyncio.timeout(CLOSE_GUARD_S):
            answer_head = await reader.readuntil(b"\r\n\r\n")
            length = int(answer_head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            answer = answer_head + await reader.readexactly(length)
            rest = await reader.read()
        return answer, rest
    finally:
        writer.close()


def request_head(path: str, length: int, encoding: str) -> str:
    return (
        f"POST {path} HTTP/1.1\r\nHost: mlgate\r\nContent-Type: application/json\r\n"
        f"Content-Encoding: {encoding}\r\nContent-Length: {length}\r\n\r\n"
    )


async def test_an_answer_before_an_undecodable_encoded_body_says_close_and_logs_no_error(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    body = b'{"inputs": []}'  # said to be gzip, and not
    with caplog.at_level(logging.INFO):
        answer, rest = await exchange(client, request_head("/v2/models/nope/infer", len(body), "gzip"), body)
    assert answer.startswith(b"HTTP/1.1 404")
    assert b"Connection: close" in answer  # the client does not send its next one here
    assert rest == b""
    assert [record for record in caplog.records if record.levelno >= logging.ERROR] == []
    [unreadable] = [record for record in caplog.records if "client_body_unreadable" in record.getMessage()]
    assert unreadable.levelno == logging.WARNING and unreadable.exc_info is None


async def test_a_connection_close_answer_closes_the_socket_at_once(client: Client) -> None:
    whole = gzip.compress(msgspec.json.encode({"source": "s", "records": [{"features": [1.0]}]}))
    corrupted = whole[:10] + b"\xff" * 20 + whole[30:]
    answer, rest = await exchange(client, request_head("/api/v2/ingest", len(corrupted), "gzip"), corrupted)
    assert answer.startswith(b"HTTP/1.1 400")
    assert b"Connection: close" in answer
    assert rest == b""


async def test_a_compressed_body_read_whole_keeps_the_connection(client: Client) -> None:
    body = gzip.compress(msgspec.json.encode({"source": "s", "records": [{"features": [1.0, 2.0, 3.0, 4.0]}]}))
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        for _ in range(2):  # the second request on the same connection is answered too
            writer.write(request_head("/api/v2/ingest", len(body), "gzip").encode() + body)
            async with asyncio.timeout(CLOSE_GUARD_S):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
            assert head.startswith(b"HTTP/1.1 202"), head
            assert b"Connection: close" not in head
    finally:
        writer.close()
