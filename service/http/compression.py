"""Compressed answers: the coding a request's ``Accept-Encoding`` prefers (RFC 9110,
12.5.3) among those offered, and a body compressed in it.

Triton compresses an infer answer in gzip or deflate (zlib's format) when the request
asks (tritonclient's ``response_compression_algorithm``); the OIP infer routes do as
it does, for answers from ``COMPRESS_FROM_BYTES`` (smaller ones would hardly shrink,
and most clients ask by default: aiohttp's and requests' send ``gzip, deflate``). A
body from ``THREAD_FROM_BYTES`` is compressed in a thread (zlib lets go of the GIL):
16 MB at zlib's default level is a few hundred ms of CPU.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib

OFFERED = ("gzip", "deflate")
COMPRESS_FROM_BYTES = 1024
THREAD_FROM_BYTES = 256 * 1024
LEVEL = 6  # zlib's default, as Triton's
_ALIASES = {"x-gzip": "gzip"}


def answer_coding(accept_encoding: str | None, body: bytes) -> str | None:
    """The coding to compress an answer ``body`` in, or None to send it as it is."""
    return None if len(body) < COMPRESS_FROM_BYTES else preferred_coding(accept_encoding)


def preferred_coding(accept_encoding: str | None, offered: tuple[str, ...] = OFFERED) -> str | None:
    """The coding of ``offered`` with the highest weight above 0 (its own, ``x-gzip``'s
    for gzip, the higher if both, else ``*``'s), the first offered on a tie; None when
    none is acceptable or nothing is asked."""
    if not accept_encoding:
        return None
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        coding, *params = item.split(";")
        coding = coding.strip().lower()
        coding = _ALIASES.get(coding, coding)
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value.strip())
                except ValueError:
                    weight = 0.0
        weights[coding] = max(weight, weights.get(coding, weight))
    best, best_weight = None, 0.0
    for coding in offered:
        weight = weights.get(coding, weights.get("*", 0.0))
        if weight > best_weight:  # NaN is never above
            best, best_weight = coding, weight
    return best


def compressed(body: bytes, coding: str) -> bytes:
    """``body`` in ``coding``: gzip, or deflate as HTTP means it (zlib's format)."""
    if coding == "gzip":
        return gzip.compress(body, compresslevel=LEVEL, mtime=0)
    return zlib.compress(body, LEVEL)


def decompressed(body: bytes, coding: str) -> bytes:
    """``body`` as it was before ``compressed`` in ``coding``."""
    return gzip.decompress(body) if coding == "gzip" else zlib.decompress(body)


async def compress(body: bytes, coding: str) -> bytes:
    """``compressed``, in a thread for a body from ``THREAD_FROM_BYTES``."""
    if len(body) < THREAD_FROM_BYTES:
        return compressed(body, coding)
    return await asyncio.get_running_loop().run_in_executor(None, compressed, body, coding)
