"""The local log's frames: ``u32 length | u32 crc32(payload) | payload``, read back.

The payload is the msgpack of an ``OutboundRecord`` (an array: key, value, headers).
Frames carry no offset of their own: a record's offset is its segment's first offset
plus the number of frames before it, so reading must count every frame once, damaged
ones included, or every offset after a damaged frame would move.

Damage is found by resynchronising: past a bad frame, the next intact frame (length
in bounds, checksum matching, payload decoding) is searched for byte by byte, cheaply,
since only positions whose payload would start with a msgpack array header are tried.
A bad frame with an intact frame anywhere after it is not a torn write (frames are
fsync'd before they are acknowledged, and a crash can only tear the end of what was
being written): the damaged bytes between them keep their offsets, and the frames
after keep theirs. Only damage with nothing intact after it ends the reading: in the
last segment, a torn tail.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterator

import msgspec
import structlog

from mlgate.workers.sinks.records import OutboundRecord

log = structlog.get_logger("mlgate.local_log")

HEADER = struct.Struct(">II")
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(OutboundRecord).decode
# The first byte of every payload: a msgpack array header (fixarray, array 16, array 32).
_ARRAY_HEADER = re.compile(rb"[\x90-\x9f\xdc\xdd]")


def frame(record: OutboundRecord) -> bytes:
    payload = _encode(record)
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _decoded(payload: memoryview) -> OutboundRecord | None:
    try:
        return _decode(payload)
    except msgspec.MsgspecError:
        return None


def _frame_at(data: bytes, position: int) -> tuple[int, OutboundRecord | None]:
    """(end, record) of the frame at ``position``: record None if its header or payload
    is cut short, fails its checksum or does not decode."""
    if position + HEADER.size > len(data):
        return len(data), None
    length, checksum = HEADER.unpack_from(data, position)
    start = position + HEADER.size
    if length == 0 or start + length > len(data):
        return start + length, None
    payload = memoryview(data)[start : start + length]
    if zlib.crc32(payload) != checksum:
        return start + length, None
    return start + length, _decoded(payload)


def _next_intact(data: bytes, after: int) -> int:
    """Position of the first intact frame starting past ``after``; -1 if there is none."""
    for match in _ARRAY_HEADER.finditer(data, after + 1 + HEADER.size):
        position = match.start() - HEADER.size
        if _frame_at(data, position)[1] is not None:
            return position
    return -1


def _looks_like_a_frame(data: bytes, position: int, stop: int) -> bool:
    return position + HEADER.size < stop and _ARRAY_HEADER.match(data, position + HEADER.size) is not None


def _damaged_run(data: bytes, start: int, stop: int) -> list[tuple[int, OutboundRecord | None]]:
    """The frames of the damaged bytes ``[start, stop)``, ``stop`` being an intact frame.

    Their lengths are followed while they land on something that looks like a frame
    (payloads damaged, lengths intact: one offset each). A frame whose checksum matches
    its bytes up to ``stop`` had only its length damaged: its record is whole. Where a
    length leads nowhere, the rest is counted as one frame.
    """
    run: list[tuple[int, OutboundRecord | None]] = []
    position = start
    while True:
        if position + HEADER.size > stop:
            run.append((stop, None))
            return run
        length, checksum = HEADER.unpack_from(data, position)
        payload = memoryview(data)[position + HEADER.size : stop]
        if zlib.crc32(payload) == checksum and (record := _decoded(payload)) is not None:
            log.warning("local_log_frame_length_damaged", position=position, record_kept=True)
            run.append((stop, record))
            return run
        end = position + HEADER.size + length
        if end >= stop or end <= position or not _looks_like_a_frame(data, end, stop):
            run.append((stop, None))
            return run
        run.append((end, None))
        position = end


def read_frames(data: bytes) -> Iterator[tuple[int, OutboundRecord | None]]:
    """(end position, record) for each frame, in order; record None for a damaged one.

    Damage that an intact frame follows keeps its offsets and reading goes on past it;
    damage with nothing intact after it (a torn tail, or a frame still being written)
    ends the reading, so the last end yielded is short of ``len(data)``.
    """
    position = 0
    while position < len(data):
        end, record = _frame_at(data, position)
        if record is None:
            following = _next_intact(data, position)
            if following < 0:
                return
            run = _damaged_run(data, position, following)
            yield from run
            position = following
            continue
        position = end
        yield position, record
