"""aiohttp's shutdown ends a body still being read with a ``CancelledError`` of its own
(``RequestHandler.shutdown``), not a cancellation of the route: a stream busy writing
records when the body was ended is still answered 503 saying which of its records were
written, not cut with nothing said. On the server ``mlgate serve`` runs, over a raw
socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import msgspec
from aiohttp import web

from mlgate.config import Settings
from mlgate.service.app import create_app
from mlgate.service.process.server import CappedAppRunner
from mlgate.service.state import RECORD_SINK
from tests.service.http.test_body_compressed_ends import read_answer
from tests.support import free_port, until


async def test_a_stream_ended_by_aiohttps_shutdown_is_answered_503_naming_what_was_written(
    make_settings: Callable[..., Settings],
) -> None:
    app = create_app(make_settings(feature_dims=(4,)))
    runner = CappedAppRunner(app, max_connections=10, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = b"".join(
            json.dumps({"record_id": f"r{i}", "features": [0.5] * 4}).encode() + b"\n"
            for i in range(1500)
        )
        writer.write(
            b"POST /api/v2/ingest/stream?source=s HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
            + f"{len(lines):x}\r\n".encode() + lines + b"\r\n"
        )  # then nothing more: the body is still open
        await until(lambda: app[RECORD_SINK].next_offset == 1000)  # its first chunk
        # Its graceful wait over, aiohttp ends the body still open.
        assert runner.server is not None
        shutdown = asyncio.create_task(runner.server.shutdown(0.5))
        status_line, headers, body = await read_answer(reader)
        await shutdown
    finally:
        writer.close()
        await runner.cleanup()
    assert status_line.split()[1] == "503"
    assert headers["Connection"] == "close"
    problem = msgspec.json.decode(body)
    assert problem["type"].endswith("/shutting-down")
    assert "The first 1000 records accepted from this stream were written" in problem["detail"]
