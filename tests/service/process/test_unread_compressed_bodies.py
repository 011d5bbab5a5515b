"""A request answered before its compressed body was read (a 401, an open route that
ignores bodies) is answered with ``Connection: close``, then our side of the
connection ends, and the rest of its body is dropped unread: never decompressed, so a
small gzip of gigabytes of zeros cannot hold the event loop. On the server
``mlgate serve`` runs (``CappedAppRunner``), over raw sockets."""
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable

import msgspec
from aiohttp import web

from tests.service.http import test_body_compressed_ends
from tests.service.http.test_body_compressed_ends import DoorServer, read_answer

ZEROS_MB = 256


def gzip_of_zeros(megabytes: int) -> bytes:
    """A gzip member of ``megabytes`` MiB of zeros (about a thousandth of that)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    return b"".join(packer.compress(block) for _ in range(megabytes)) + packer.flush()


BOMB = gzip_of_zeros(ZEROS_MB)


def head(method: str, path: str, length: int) -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Content-Encoding: gzip\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


# The server fixture, under the name the tests ask for it by (hence F811 below).
door_server = test_body_compressed_ends.door_server


def ignoring_bodies(seen: list[web.Request]) -> Callable[[web.Application], None]:
    """A route ``/ignores-body`` that answers without reading the body, keeping its
    requests in ``seen`` (to see what was read of them)."""

    async def ignores_body(request: web.Request) -> web.Response:
        seen.append(request)
        return web.json_response({"ok": True})

    def prepare(app: web.Application) -> None:
        app.router.add_post("/ignores-body", ignores_body)

    return prepare


async def test_the_rest_of_a_compressed_body_answered_unread_is_never_decompressed(
    door_server: DoorServer,
) -> None:
    seen: list[web.Request] = []
    address = await door_server(prepare=ignoring_bodies(seen))
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(head("POST", "/ignores-body", len(BOMB)) + BOMB[:1024])
        status_line, headers, _ = await read_answer(reader)
        assert status_line.split()[1] == "200"
        assert headers["Connection"] == "close"
        writer.write(BOMB[1024:])  # the whole bomb reaches the server...
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # ...which then closes
    finally:
        writer.close()
    [request] = seen
    # What was decompressed before the answer, at most: not the 256 MiB of the rest.
    assert request.content.total_bytes < 16 * 1024 * 1024


async def test_a_keyless_request_with_a_compressed_body_gets_its_401_then_the_end(
    door_server: DoorServer,
) -> None:
    address = await door_server(auth_disabled=False)
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(head("POST", "/api/v2/ingest", len(BOMB)) + BOMB[:1024])
        status_line, headers, body = await read_answer(reader)
        assert status_line.split()[1] == "401"
        assert headers["Content-Type"] == "application/problem+json"
        assert msgspec.json.decode(body)["status"] == 401
        assert headers["Connection"] == "close"
        # Our side ends after the answer, while the client is still sending its body.
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()


async def test_a_compressed_body_that_was_read_keeps_the_connection_open(
    door_server: DoorServer,
) -> None:
    address = await door_server()
    body = zlib.compress(
        msgspec.json.encode({"source": "s", "records": [{"features": [1.0, 2.0, 3.0, 4.0]}]}), wbits=31
    )
    reader, writer = await asyncio.open_connection(*address)
    try:
        for _ in range(2):
            writer.write(head("POST", "/api/v2/ingest", len(body)) + body)
            status_line, headers, _ = await read_answer(reader)
            assert status_line.split()[1] == "202"
            assert "Connection" not in headers
    finally:
        writer.close()
