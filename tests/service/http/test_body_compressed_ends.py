"""A compressed body whose compressed stream is cut short (the HTTP body itself ends
properly) is 400, not its decompressed part taken for the whole; concatenated gzip
members and zstd frames still make one body. On the server ``mlgate serve`` runs
(``CappedAppRunner``, whose door makes aiohttp's decoder check the end), over sockets."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
from aiohttp import web
from backports import zstd

from mlgate.config import Settings
from mlgate.service.app import create_app
from mlgate.service.process.server import CappedAppRunner
from mlgate.service.state import SETTINGS
from tests.support import free_port

DoorServer = Callable[..., Awaitable[tuple[str, int]]]
BATCH = "/api/v2/ingest"
STREAM = "/api/v2/ingest/stream?source=s"


@pytest.fixture
async def door_server(make_settings: Callable[..., Settings]) -> AsyncIterator[DoorServer]:
    """Start the app as ``mlgate serve`` serves it; (host, port)."""
    runners: list[web.AppRunner] = []

    async def make(
        prepare: Callable[[web.Application], None] | None = None, **settings: Any
    ) -> tuple[str, int]:
        """``prepare``: called with the app before it starts (a route of the test's own)."""
        settings.setdefault("feature_dims", (4,))
        app = create_app(make_settings(**settings))
        if prepare is not None:
            prepare(app)
        runner = CappedAppRunner(
            app, max_connections=100, access_log=None, keepalive_timeout=app[SETTINGS].head_timeout_s
        )
        await runner.setup()
        runners.append(runner)
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return "127.0.0.1", port

    yield make
    for runner in runners:
        await runner.cleanup()


async def read_answer(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    """One answer off a raw connection: (status line, headers, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if line)
    body = await asyncio.wait_for(reader.readexactly(int(headers["Content-Length"])), 10)
    return lines[0], headers, body


async def send(
    address: tuple[str, int], path: str, body: bytes, encoding: str, media: str = "application/json"
) -> tuple[int, dict[str, Any]]:
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {media}\r\n"
            f"Content-Encoding: {encoding}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        status_line, _, answer = await read_answer(reader)
        return int(status_line.split()[1]), msgspec.json.decode(answer)
    finally:
        writer.close()


def batch(count: int, start: int = 0) -> bytes:
    records = [{"record_id": f"r{start + i}", "features": [1.0, 2.0, 3.0, 4.0]} for i in range(count)]
    return msgspec.json.encode({"source": "s", "records": records})


def ndjson(count: int) -> bytes:
    return b"".join(
        msgspec.json.encode({"record_id": f"n{i}", "features": [1.0, 2.0, 3.0, 4.0]}) + b"\n"
        for i in range(count)
    )


def cut_before_trailer(encoding: str, body: bytes) -> bytes:
    """``body`` compressed, with everything after its last decompressed byte's data
    cut: it still decompresses to all of ``body``, but its stream does not end."""
    if encoding == "gzip":
        return gzip.compress(body)[:-8]  # CRC32 and size trailer gone
    if encoding == "deflate":
        compressor = zlib.compressobj()
        return compressor.compress(body) + compressor.flush(zlib.Z_SYNC_FLUSH)
    compressor = zstd.ZstdCompressor()
    return compressor.compress(body) + compressor.flush(zstd.ZstdCompressor.FLUSH_BLOCK)


@pytest.mark.parametrize("encoding", ["gzip", "zstd", "deflate"])
async def test_a_batch_body_cut_before_its_compressed_end_is_400(
    door_server: DoorServer, encoding: str
) -> None:
    address = await door_server()
    body = cut_before_trailer(encoding, batch(2))
    status, problem = await send(address, BATCH, body, encoding)
    assert status == 400
    assert "truncated" in problem["detail"]


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
async def test_a_stream_cut_at_a_line_before_its_compressed_end_is_400(
    door_server: DoorServer, encoding: str
) -> None:
    address = await door_server()
    body = cut_before_trailer(encoding, ndjson(3))
    status, problem = await send(address, STREAM, body, encoding, "application/x-ndjson")
    assert status == 400
    assert "truncated" in problem["detail"]


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
async def test_concatenated_members_are_one_whole_body(door_server: DoorServer, encoding: str) -> None:
    address = await door_server()
    compress = gzip.compress if encoding == "gzip" else zstd.compress
    whole = ndjson(40)
    lines = whole.splitlines(keepends=True)
    body = b"".join(compress(b"".join(lines[i : i + 7])) for i in range(0, len(lines), 7))
    status, answer = await send(address, STREAM, body, encoding, "application/x-ndjson")
    assert status == 202 and answer["records_accepted"] == 40


async def test_a_member_ending_with_each_http_chunk_is_a_whole_body(door_server: DoorServer) -> None:
    """Each chunk of a chunked body a whole gzip member: the decoder is fresh at the
    body's end (aiohttp replaces a finished one), which is no truncation."""
    host, port = await door_server()
    members = [gzip.compress(batch(2)[:20]), gzip.compress(batch(2)[20:])]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"POST {BATCH} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            "Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        for member in members:
            writer.write(b"%x\r\n%s\r\n" % (len(member), member))
            await writer.drain()
            await asyncio.sleep(0.05)  # each its own read: the member ends at the read's end
        writer.write(b"0\r\n\r\n")
        status_line, _, answer = await read_answer(reader)
    finally:
        writer.close()
    assert status_line.startswith("HTTP/1.1 202"), answer
    assert msgspec.json.decode(answer)["records_accepted"] == 2


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
async def test_a_whole_compressed_batch_is_accepted(door_server: DoorServer, encoding: str) -> None:
    address = await door_server()
    compress = gzip.compress if encoding == "gzip" else zstd.compress
    status, answer = await send(address, BATCH, compress(batch(3, start=10)), encoding)
    assert status == 202 and answer["records_accepted"] == 3
