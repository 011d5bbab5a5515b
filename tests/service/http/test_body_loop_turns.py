"""Reading a compressed body gives the event loop turns: aiohttp decompresses the next
piece inside the read that takes the one before, without waiting on the socket, so a
small gzip stream of blank lines once held the loop for as long as it expanded (1 MB
of it to 1 GiB: ~47 s), and ``/health`` on another connection waited for it."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable

import pytest

from mlgate.config import Settings
from mlgate.service.ingest import streams
from mlgate.service.routes import ingest as ingest_routes
from tests.conftest import AppClientFactory

# ~1 s of reading (decompressing, and runs of blank lines that are not newlines alone
# cost a scan each); the old reader held the loop all that time.
MIB_OF_BLANK_LINES = 64


def gzip_of_blank_lines(mib: int, line: bytes = b"\n") -> bytes:
    compressor = zlib.compressobj(1, wbits=31)
    megabyte = line * ((1 << 20) // len(line))
    return b"".join(compressor.compress(megabyte) for _ in range(mib)) + compressor.flush()


async def test_health_answers_while_a_compressed_stream_is_being_read(
    app_client: AppClientFactory, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Past 16 MiB such a stream is now refused: not here, to see the turns.)"""
    monkeypatch.setattr(streams, "MAX_BLANK_BYTES", 1 << 40)
    await _health_answers_during(
        app_client, make_settings, gzip_of_blank_lines(MIB_OF_BLANK_LINES, b" \n")
    )


async def test_health_answers_while_a_stream_of_cheap_bad_records_is_checked(
    app_client: AppClientFactory,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A review: turns came every 256 KiB read, but a record's checks cost more than its
    bytes: 16 KB of gzip holding 8M records ``1`` kept /health waiting 2 s at a time.
    (Such a stream now stops at 10,000 rejected records: not here, to see the turns.)"""
    monkeypatch.setattr(ingest_routes, "STREAM_MAX_REJECTED_LEAD", 10**9)
    await _health_answers_during(app_client, make_settings, gzip_of_blank_lines(2, b"1\n"))


async def _health_answers_during(
    app_client: AppClientFactory, make_settings: Callable[..., Settings], body: bytes
) -> None:
    client = await app_client(make_settings(feature_dims=(4,)))
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            "POST /api/v2/ingest/stream?source=s HTTP/1.1\r\nHost: t\r\n"
            "Content-Type: application/x-ndjson\r\nContent-Encoding: gzip\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        streamed = asyncio.create_task(reader.readuntil(b"\r\n\r\n"))
        await asyncio.sleep(0.2)  # the server is into the stream's body
        assert not streamed.done()
        health = await client.get("/health")
        assert health.status == 200
        # Answered in a turn between the stream's reads, not once it was all read.
        assert not streamed.done()
        await asyncio.wait_for(streamed, 60)
    finally:
        writer.close()
