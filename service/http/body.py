"""Reading request bodies within a size limit, without buffering past it.

aiohttp decompresses ``Content-Encoding: gzip``/``deflate`` (and ``br``/``zstd`` when
their libraries are installed) as the body streams in, so the limit counts
decompressed bytes: a small compressed bomb stops at the limit too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import http_parser, web

from mlgate.service.http.context import BUFFERED_BODY
from mlgate.service.http.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

# What aiohttp's parser can decompress here; anything else would reach us still encoded.
SUPPORTED_ENCODINGS = {"identity", "gzip", "deflate"}
if http_parser.HAS_BROTLI:
    SUPPORTED_ENCODINGS.add("br")
if getattr(http_parser, "HAS_ZSTD", False):
    SUPPORTED_ENCODINGS.add("zstd")

CHUNK = 64 * 1024


def check_declared_length(request: web.Request, limit: int) -> None:
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"Body of {declared} bytes exceeds the limit of {limit} bytes")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole (decompressed) body; 413 as soon as it passes ``limit`` bytes."""
    buffered = request.get(BUFFERED_BODY)
    if buffered is not None:  # read already (Idempotency-Key)
        if len(buffered) > limit:
            raise PayloadTooLarge(f"Body exceeds the limit of {limit} bytes")
        return buffered
    check_declared_length(request, limit)
    declared = request.content_length
    if declared == 0:
        return b""
    if declared is not None and "Content-Encoding" not in request.headers:
        # The common case, a small body of known length: one read, no chunk loop.
        try:
            return await request.content.readexactly(declared)
        except asyncio.IncompleteReadError:
            raise BadRequest("Body ended before its Content-Length", headers={"Connection": "close"}) from None
    parts: list[bytes] = []
    total = 0
    async for chunk in _chunks(request):
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"Body exceeds the limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def iter_body(request: web.Request) -> AsyncIterator[bytes]:
    """The (decompressed) body chunk by chunk, for streaming endpoints."""
    buffered = request.get(BUFFERED_BODY)
    if buffered is not None:
        for start in range(0, len(buffered), CHUNK):
            yield buffered[start : start + CHUNK]
        return
    async for chunk in _chunks(request):
        yield chunk


def check_encoding(request: web.Request) -> None:
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in SUPPORTED_ENCODINGS:
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported; use one of "
            + ", ".join(sorted(SUPPORTED_ENCODINGS)),
            headers={"Accept-Encoding": ", ".join(sorted(SUPPORTED_ENCODINGS - {"identity"}))},
        )


async def _chunks(request: web.Request) -> AsyncIterator[bytes]:
    check_encoding(request)
    try:
        async for chunk in request.content.iter_chunked(CHUNK):
            yield chunk
    except web.RequestPayloadError as exc:  # broken gzip, chunked framing, ...
        # What follows on the connection cannot be trusted: answer, then close it.
        reason = " ".join(str(exc).split())
        raise BadRequest(f"Body could not be read: {reason}", headers={"Connection": "close"}) from None
