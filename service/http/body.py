"""Reading request bodies within a size limit, without buffering past it.

aiohttp decompresses ``Content-Encoding: gzip``/``deflate`` (and ``br``/``zstd`` when
their libraries are installed) as the body streams in, so the limit counts
decompressed bytes: a small compressed bomb stops at the limit too.

A body has ``body_timeout_s`` and must then average ``body_min_rate_bytes`` per second
(Apache's ``RequestReadTimeout body=...,MinRate=...``), and no ``body_timeout_s`` may
pass without a byte of it (the average alone let a client that sent 8 MB at once sit
idle ~280 s); a slower one is 408 with ``Connection: close``, so a client that sends a
head and one byte holds its socket for seconds, not forever.

A compressed body's next piece is decompressed inside the read that takes the one
before it, without waiting on the socket: 1 MB of gzip holding 1 GiB of blank lines
kept the loop ~47 s in one body's reads. The reader gives the loop a turn every
``YIELD_S`` of reading (looked at every ``CHECK_BYTES``, so a small body costs no
clock reads). A compressed body whose compressed stream did not end (a gzip member
or zstd frame cut short, though the HTTP body ended properly) is 400, not its
decompressed part taken for the whole (``check_compressed_ends``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import compression_utils, http_parser, web
from aiohttp.helpers import set_exception

from mlgate.service.http.context import BUFFERED_BODY
from mlgate.service.http.errors import (
    BadRequest,
    BodyTimeout,
    PayloadTooLarge,
    ShuttingDown,
    UnsupportedMediaType,
)
from mlgate.service.http.held_bodies import SMALL_BODY_BYTES, HeldBodies
from mlgate.service.state import HELD_BODIES, OPEN_BODIES, SETTINGS

# What aiohttp's parser can decompress here; anything else would reach us still encoded.
SUPPORTED_ENCODINGS = {"identity", "gzip", "deflate"}
if http_parser.HAS_BROTLI:
    SUPPORTED_ENCODINGS.add("br")
if getattr(http_parser, "HAS_ZSTD", False):
    SUPPORTED_ENCODINGS.add("zstd")

CHUNK = 64 * 1024
# How long a body's reads may keep the loop without a turn for others, and how many
# bytes are read between looks at the clock.
YIELD_S = 0.005
CHECK_BYTES = 256 * 1024
TRUNCATED = "Compressed body is truncated: its compressed stream did not end"


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
    held_bodies = request.app[HELD_BODIES]
    if declared is not None and "Content-Encoding" not in request.headers:
        # The common case, a small body of known length: one read, no chunk loop, due
        # when all of it would be at the minimum rate (at most CHUNK / rate seconds past
        # the idle bound). A larger one is read chunk by chunk, each within that bound.
        try:
            if request.content.is_eof():  # all of it arrived with the head: no wait
                body = await request.content.readexactly(declared)
                if declared > SMALL_BODY_BYTES:
                    held_bodies.hold(request, declared)
                return body
            if declared > CHUNK:
                return await _read_known(request, declared, held_bodies)
            with _open(request):
                async with asyncio.timeout_at(BodyPace(request).deadline(declared)):
                    return await request.content.readexactly(declared)
        except asyncio.IncompleteReadError:
            raise BadRequest("Body ended before its Content-Length", headers={"Connection": "close"}) from None
        except TimeoutError:
            raise _too_slow(request) from None
        except web.RequestPayloadError as exc:  # the client half-closed before its end
            raise _unreadable(request, exc) from None
    parts: list[bytes] = []
    total = counted = 0
    async for chunk in _chunks(request):
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"Body exceeds the limit of {limit} bytes")
        counted = _held(held_bodies, request, total, counted)
        parts.append(chunk)
    return b"".join(parts)


def _held(held_bodies: HeldBodies, request: web.Request, total: int, counted: int) -> int:
    """The body's ``total`` bytes read so far held (what was not yet, once past
    ``SMALL_BODY_BYTES``): bytes received, not declared, so a head that declares 16 MB
    and sends nothing holds nothing (a review: 32 such heads held the bound for every
    tenant). What is now counted."""
    if total <= SMALL_BODY_BYTES:
        return counted
    held_bodies.hold(request, total - counted)
    return total


async def _read_known(request: web.Request, declared: int, held_bodies: HeldBodies) -> bytes:
    """A plain body of ``declared`` bytes, read chunk by chunk within the pace."""
    parts: list[bytes] = []
    total = counted = 0
    async for chunk in _chunks(request):
        total += len(chunk)
        counted = _held(held_bodies, request, total, counted)
        parts.append(chunk)
    body = b"".join(parts)
    if len(body) != declared:  # aiohttp ends the body at its Content-Length
        raise asyncio.IncompleteReadError(body, declared)
    return body


async def iter_body(request: web.Request) -> AsyncIterator[bytes]:
    """The (decompressed) body chunk by chunk, for streaming endpoints; ``ShuttingDown``
    if a shutdown ends it first (``end_open_bodies``)."""
    buffered = request.get(BUFFERED_BODY)
    if buffered is not None:
        for start in range(0, len(buffered), CHUNK):
            yield buffered[start : start + CHUNK]
        return
    async for chunk in _chunks(request, limit_chunks=True):
        yield chunk


@contextmanager
def _open(request: web.Request) -> Iterator[None]:
    """While the body is read and may wait for bytes: ``end_open_bodies`` can end it."""
    bodies = request.app[OPEN_BODIES]
    bodies.add(request.content)
    try:
        yield
    finally:
        bodies.discard(request.content)


def _body_ended(app: web.Application) -> ShuttingDown:
    return ShuttingDown(
        "The server is shutting down: the rest of this body was not read",
        retry_after_s=app[SETTINGS].retry_after_s,
        headers={"Connection": "close"},
    )


def end_open_bodies(app: web.Application) -> int:
    """End every body still being read: its next read, or the one waiting for bytes
    that have not come (a paused or slow client), raises ``ShuttingDown``, so its route
    answers 503 (a stream's saying which records were written), rather than aiohttp
    cutting the connection at the end of its wait with nothing said. How many it ended."""
    bodies = app[OPEN_BODIES]
    for body in bodies:
        body.set_exception(_body_ended(app))
    ended = len(bodies)
    bodies.clear()
    return ended


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
    ``body_timeout_s`` from the first read it must average ``body_min_rate_bytes``/s;
    and (``next_deadline``) no ``body_timeout_s`` may pass without a byte."""

    __slots__ = ("_idle", "_rate", "_start", "loop")

    def __init__(self, request: web.Request) -> None:
        settings = request.app[SETTINGS]
        self.loop = asyncio.get_running_loop()
        self._idle = settings.body_timeout_s
        self._start = self.loop.time() + self._idle
        self._rate = settings.body_min_rate_bytes

    def deadline(self, received: int) -> float:
        """The loop time by which more than ``received`` bytes must have arrived, at
        the minimum rate."""
        return self._start + received / self._rate

    def next_deadline(self, received: int) -> tuple[float, bool]:
        """As ``deadline``, and within ``body_timeout_s`` of now (the last byte); and
        whether it is that pause bound that comes first."""
        average, pause = self._start + received / self._rate, self.loop.time() + self._idle
        return (pause, True) if pause < average else (average, False)


def _too_slow(request: web.Request, paused: bool = False) -> BodyTimeout:
    """The 408; ``paused``: for a body that stopped, not one too slow on average."""
    settings = request.app[SETTINGS]
    if paused:
        reason = f"Body paused longer than {settings.body_timeout_s:g} s"
    else:
        reason = (
            f"Body arrived slower than {settings.body_min_rate_bytes} bytes/s "
            f"after {settings.body_timeout_s:g} s"
        )
    return BodyTimeout(reason, headers={"Connection": "close"})


async def _chunks(request: web.Request, limit_chunks: bool = False) -> AsyncIterator[bytes]:
    """The body as it comes, within the pace; ``limit_chunks``: at most ``CHUNK`` bytes
    a piece (a stream's record scanner holds one piece beside a record)."""
    check_encoding(request)
    with _open(request):
        pace = BodyPace(request)
        received = 0
        check_at = CHECK_BYTES
        turn_due = -1.0  # loop time by which the loop gets a turn; set at the first look
        while True:
            try:
                deadline, paused = pace.next_deadline(received)
                async with asyncio.timeout_at(deadline):
                    if limit_chunks:
                        chunk = await request.content.read(CHUNK)
                    else:
                        # What is buffered, whole: read(CHUNK) slices what uvloop received
                        # and joins again (bench.body_read: a 900 KB body in 256 KiB
                        # pieces, 240-400 µs against ~60 read so; in 64 KiB, 230-315
                        # against ~145).
                        chunk = await request.content.readany()
            except TimeoutError:
                raise _too_slow(request, paused) from None
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                # Not this task cancelled: aiohttp's shutdown put a CancelledError on the
                # body (``RequestHandler.shutdown``), over the ``ShuttingDown`` of
                # ``end_open_bodies`` when the route was busy writing records then. Its
                # route answers 503 as for that, the stream's detail saying what was
                # written, rather than nothing at all (a review).
                raise _body_ended(request.app) from None
            except web.RequestPayloadError as exc:  # broken gzip, chunked framing, ...
                raise _unreadable(request, exc) from None
            if not chunk:
                return
            received += len(chunk)
            if received >= check_at:
                # A read of buffered (or decompressed) bytes returns without a turn of the
                # loop: every CHECK_BYTES, give it one if YIELD_S passed since the last.
                check_at = received + CHECK_BYTES
                now = pace.loop.time()
                if turn_due < 0:
                    turn_due = now + YIELD_S
                elif now >= turn_due:
                    await asyncio.sleep(0)
                    turn_due = pace.loop.time() + YIELD_S
            yield chunk


def _unreadable(request: web.BaseRequest, exc: web.RequestPayloadError) -> BadRequest:
    """The 400 for a body that could not be read. What follows on the connection cannot
    be trusted: answer, then close it. Nothing more is read of it: aiohttp would read on
    after the answer, meet the error again and log it as an unhandled exception with
    its traceback."""
    request.content.feed_eof()
    if isinstance(exc, CompressedBodyTruncated):
        return BadRequest(TRUNCATED, headers={"Connection": "close"})
    reason = " ".join(str(exc).split())
    return BadRequest(f"Body could not be read: {reason}", headers={"Connection": "close"})


class CompressedBodyTruncated(web.RequestPayloadError):
    """The HTTP body ended inside a gzip member or zstd frame (or a deflate or brotli
    stream): what it decompressed to is not the whole."""


class _Member:
    """One gzip member's or zstd frame's decompressor, telling whether it was fed: aiohttp
    replaces a finished one with a fresh one at once (``ConcatDecompressionHandler``), so
    ``eof`` alone cannot tell a stream that ended from one cut inside a member."""

    __slots__ = ("_inner", "fed")

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.fed = False

    def decompress(self, data: Any, *args: Any) -> bytes:
        if data:
            self.fed = True
        return self._inner.decompress(data, *args)

    def __getattr__(self, name: str) -> Any:  # eof, unused_data, unconsumed_tail, ...
        return getattr(self._inner, name)


def _stream_ended(decompressor: Any) -> bool:
    """Whether the compressed stream a body fed ``decompressor`` ended where it did."""
    if isinstance(decompressor, compression_utils.BrotliDecompressor):
        finished = getattr(decompressor._obj, "is_finished", None)
        return finished is None or bool(finished())
    if not isinstance(decompressor, compression_utils.ConcatDecompressionHandler):
        return True  # unknown to us: as aiohttp decides
    if decompressor._pending_unused_data is not None:
        return False
    inner = decompressor._decompressor
    if isinstance(inner, _Member):  # gzip, zstd: at a member's end, or a fresh one
        return bool(inner.eof) or not inner.fed
    return bool(inner.eof)  # deflate: one stream, its decompressor kept to the end


def check_compressed_ends() -> None:
    """Make aiohttp's decompressing body feeder (``DeflateBuffer``, which its C parser
    holds, so it cannot be replaced by a subclass) fail a server request's body whose
    compressed stream did not end with the body: aiohttp checks that for ``deflate``
    only, by raising from the parser, which answered 415 and left the body unended.
    Here the body gets ``CompressedBodyTruncated``, read as a 400. Once per process."""
    feeder: Any = http_parser.DeflateBuffer
    if getattr(feeder, "_mlgate_checks_ends", False):
        return
    original_init, original_feed_eof = feeder.__init__, feeder.feed_eof

    def __init__(self: Any, out: Any, encoding: str | None, *args: Any, **kwargs: Any) -> None:
        original_init(self, out, encoding, *args, **kwargs)
        # Server bodies only (aiohttp's client keeps its own behaviour).
        self.mlgate_checked = isinstance(getattr(out, "_protocol", None), web.RequestHandler)
        decompressor = self.decompressor
        if self.mlgate_checked and encoding in {"gzip", "zstd"}:
            new_member = decompressor._new_decompressor
            decompressor._new_decompressor = lambda: _Member(new_member())
            decompressor._decompressor = _Member(decompressor._decompressor)

    def feed_eof(self: Any) -> None:
        if getattr(self, "mlgate_checked", False) and self.size > 0 and not _stream_ended(self.decompressor):
            set_exception(self.out, CompressedBodyTruncated(TRUNCATED))
            return
        original_feed_eof(self)

    feeder.__init__, feeder.feed_eof = __init__, feed_eof
    feeder._mlgate_checks_ends = True
