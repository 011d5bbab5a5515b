"""``python -m bench.body_read``: what reading a batch body costs the event loop, by the
way it is read from aiohttp's ``StreamReader``.

A 500-record JSON batch of workload.md traffic is ~900 KB; uvloop hands aiohttp up to
256 KiB a receive, so its body sits in the reader in pieces of that size (64 KiB
pieces are measured too). Each way is timed over the same pieces, in process:
- ``read(64 KiB)`` and a join (stop 31's reader, for the pause bound between reads);
- one ``readexactly`` (the reader before stop 31);
- ``readany`` and a join (the reader since stop 32: each read takes what is buffered).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from unittest import mock

from aiohttp.streams import StreamReader

BODY_BYTES = 900_000
PIECE_SIZES = (64 * 1024, 256 * 1024)
ROUNDS = 300


async def _by_read_64k(reader: StreamReader) -> bytes:
    parts = []
    while chunk := await reader.read(64 * 1024):
        parts.append(chunk)
    return b"".join(parts)


async def _by_readexactly(reader: StreamReader) -> bytes:
    return await reader.readexactly(BODY_BYTES)


async def _by_readany(reader: StreamReader) -> bytes:
    parts = []
    while chunk := await reader.readany():
        parts.append(chunk)
    return b"".join(parts)


WAYS: dict[str, Callable[[StreamReader], Awaitable[bytes]]] = {
    "read(64 KiB) + join": _by_read_64k,
    "readexactly": _by_readexactly,
    "readany + join": _by_readany,
}


async def _time(read: Callable[[StreamReader], Awaitable[bytes]], piece: int) -> float:
    """Mean µs to read the body, the reader already holding all of it in ``piece``s."""
    body = b"x" * BODY_BYTES
    loop = asyncio.get_running_loop()
    protocol = mock.Mock(_reading_paused=False)  # the reader only asks it to pause/resume
    spent = 0.0
    for _ in range(ROUNDS):
        reader = StreamReader(protocol, 2**20, loop=loop)
        for start in range(0, BODY_BYTES, piece):
            reader.feed_data(body[start : start + piece])
        reader.feed_eof()
        started = time.perf_counter()
        assert len(await read(reader)) == BODY_BYTES
        spent += time.perf_counter() - started
    return spent / ROUNDS * 1e6


async def main() -> None:
    print(f"reading a {BODY_BYTES:,}-byte body already buffered, mean of {ROUNDS} rounds")
    print("| pieces | " + " | ".join(WAYS) + " |")
    print("| --- |" + " ---: |" * len(WAYS))
    for piece in PIECE_SIZES:
        cells = [f"{await _time(read, piece):.0f} µs" for read in WAYS.values()]
        print(f"| {piece // 1024} KiB | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    asyncio.run(main())
