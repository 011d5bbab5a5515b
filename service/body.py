"""Reading request bodies within a size limit, without buffering past it.

aiohttp decompresses ``Content-Encoding: gzip``/``deflate`` (and ``br``/``zstd`` when
their libraries are installed) as the body streams in, so the limit counts
decompressed bytes: a small compressed bomb stops at the limit too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from service.errors import PayloadTooLarge

CHUNK = 64 * 1024


def check_declared_length(request: web.Request, limit: int) -> None:
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"Body of {declared} bytes exceeds the limit of {limit} bytes")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole (decompressed) body; 413 as soon as it passes ``limit`` bytes."""
    check_declared_length(request, limit)
    parts: list[bytes] = []
    total = 0
    async for chunk in request.content.iter_chunked(CHUNK):
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"Body exceeds the limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def iter_body(request: web.Request) -> AsyncIterator[bytes]:
    """The (decompressed) body chunk by chunk, for streaming endpoints."""
    async for chunk in request.content.iter_chunked(CHUNK):
        yield chunk
