"""Reading request bodies within a size limit, without buffering past it.

aiohttp decompresses ``Content-Encoding: gzip``/``deflate`` (and ``br``/``zstd`` when
their libraries are installed) as the body streams in, so the limit counts
decompressed bytes: a small compressed bomb stops at the limit too.

A body has ``body_timeout_s`` and must then average ``body_min_rate_bytes`` per second
(Apache's ``RequestReadTimeout body=...,MinRate=...``); a slower one is 408 with
``Connection: close``, so a client that sends a head and one byte holds its socket
for seconds, not forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import http_parser, web

from mlgate.service.http.context import BUFFERED_BODY
from mlgate.service.http.errors import (
    BadRequest,
    BodyTimeout,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from mlgate.service.state import SETTINGS

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
        # The body is not read: this connection cannot carry another request. Its
        # upload is drained a while (aiohttp's lingering) so the client sees the answer.
        raise PayloadTooLarge(
            f"Body of {declared} bytes exceeds the limit of {limit} bytes",
            headers={"Connection": "close"},
        )


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
        # The common case, a small body of known length: one read, no chunk loop, due
        # when all of it would be at the minimum rate.
        try:
            if request.content.is_eof():  # all of it arrived with the head: no wait
                return await request.content.readexactly(declared)
            async with asyncio.timeout_at(BodyPace(request).deadline(declared)):
                return await request.content.readexactly(declared)
        except asyncio.IncompleteReadError:
            raise BadRequest("Body ended before its Content-Length", headers={"Connection": "close"}) from None
        except TimeoutError:
            raise _too_slow(request) from None
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


class BodyPace:
    """When a body that has delivered ``received`` bytes is too slow: after a grace of
    ``body_timeout_s`` from the first read it must average ``body_min_rate_bytes``/s."""

    __slots__ = ("_rate", "_start")

    def __init__(self, request: web.Request) -> None:
        settings = request.app[SETTINGS]
        self._start = asyncio.get_running_loop().time() + settings.body_timeout_s
        self._rate = settings.body_min_rate_bytes

    def deadline(self, received: int) -> float:
        """The loop time by which more than ``received`` bytes must have arrived."""
        return self._start + received / self._rate


def _too_slow(request: web.Request) -> BodyTimeout:
    settings = request.app[SETTINGS]
    return BodyTimeout(
        f"Body arrived slower than {settings.body_min_rate_bytes} bytes/s "
        f"after {settings.body_timeout_s:g} s",
        headers={"Connection": "close"},
    )


async def _chunks(request: web.Request) -> AsyncIterator[bytes]:
    check_encoding(request)
    pace = BodyPace(request)
    received = 0
    while True:
        try:
            async with asyncio.timeout_at(pace.deadline(received)):
                chunk = await request.content.read(CHUNK)
        except TimeoutError:
            raise _too_slow(request) from None
        except web.RequestPayloadError as exc:  # broken gzip, chunked framing, ...
            # What follows on the connection cannot be trusted: answer, then close it.
            # Nothing more is read of it: aiohttp would read on after the answer, meet
            # the error again and log it as an unhandled exception with its traceback.
            request.content.feed_eof()
            reason = " ".join(str(exc).split())
            raise BadRequest(f"Body could not be read: {reason}", headers={"Connection": "close"}) from None
        if not chunk:
            return
        received += len(chunk)
        yield chunk
