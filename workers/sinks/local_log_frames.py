"""The local log's frames: ``u32 length | u32 crc32(payload) | payload``, read back.

The payload is the msgpack of an ``OutboundRecord`` (an array: key, value, headers).
Frames carry no offset of their own: a record's offset is its segment's first offset
plus the number of frames before it.

Damage is told from a torn write by what follows it: bad frames whose lengths lead,
one after the other, to an intact frame keep their offsets; ones that lead to
nothing intact end the reading (in the last segment, a torn tail). Not searched for past that: frames carry no
marker, and a search finds frames inside a record's own bytes (a review forged one
in a msgpack value, and a reader's 8 MiB chunk cut a frame in two, every time) — so a
length whose own bytes are damaged still cuts what follows it, kept aside on open.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

import msgspec

from mlgate.workers.sinks.records import OutboundRecord

HEADER = struct.Struct(">II")
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(OutboundRecord).decode


def frame(record: OutboundRecord) -> bytes:
    payload = _encode(record)
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _frame_at(data: bytes, position: int) -> tuple[int, OutboundRecord | None]:
    """(end, record) of the frame at ``position``: record None if its payload is cut
    short, fails its checksum or does not decode; end -1 if even its header is cut."""
    if position + HEADER.size > len(data):
        return -1, None
    length, checksum = HEADER.unpack_from(data, position)
    start = position + HEADER.size
    payload = data[start : start + length]
    if len(payload) < length or zlib.crc32(payload) != checksum:
        return start + length, None
    try:
        return start + length, _decode(payload)
    except msgspec.MsgspecError:
        return start + length, None


def read_frames(data: bytes) -> Iterator[tuple[int, OutboundRecord | None]]:
    """(end position, record) for each frame, in order.

    A bad frame (checksum or decoding) whose length still leads, through any bad frames
    after it, each by its own length, to an intact frame was damaged after it was
    written, since frames are fsync'd before they are acknowledged (one bad sector
    spans several small frames): each keeps its offset, with record None, and reading
    goes on. A bad frame whose lengths lead to no intact frame within ``data`` is a
    torn tail (a crash mid-write), or the end of a reader's chunk: reading stops there.
    """
    position = 0
    while True:
        end, record = _frame_at(data, position)
        if end < 0:
            return
        if record is not None:
            position = end
            yield position, record
            continue
        damaged = [end]
        while True:
            if end > len(data):
                return
            end, record = _frame_at(data, end)
            if end < 0:
                return
            if record is not None:
                break
            damaged.append(end)
        for end_of_damaged in damaged:
            yield end_of_damaged, None
        position = damaged[-1]


def intact_frame_after(data: bytes, start: int) -> int | None:
    """The position of the first intact frame (its length within ``data``, its
    checksum right, its record decoding) past ``start``, found byte by byte; None when
    there is none. For a reader that stopped at bytes its frame lengths could not get
    past: a torn tail has none after it."""
    for position in range(start + 1, len(data) - HEADER.size + 1):
        length, _ = HEADER.unpack_from(data, position)
        if position + HEADER.size + length > len(data):
            continue
        end, record = _frame_at(data, position)
        if record is not None:
            return position
    return None
