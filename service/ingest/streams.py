"""Record streams: NDJSON lines or concatenated msgpack maps, decoded one record at a time.

Each yields, per record, the decoded ``Record`` or its ``RecordError`` (a bad record
costs only itself: so does a msgpack map keyed by an array or a map, valid msgpack that
no record can be); a record over ``max_stream_record_bytes`` is 413 and bytes that
are not msgpack at all are 400. Memory holds at most one unfinished record and the
chunk after it, whatever the stream's length.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack
import msgspec
from aiohttp import web

from mlgate.schemas.ingest import Record, RecordError, RecordIdOnly
from mlgate.service.http.body import CHUNK, iter_body
from mlgate.service.http.codec import Format
from mlgate.service.http.errors import BadRequest, PayloadTooLarge
from mlgate.service.ingest.validation import given_record_id, record_error


def _record_or_error(
    index: int, decoded: Record | Exception, raw: Any, read_id: Callable[[Any], str | None]
) -> Record | RecordError:
    """A rejected record's error names the id it gave (``read_id(raw)``), if valid."""
    return decoded if isinstance(decoded, Record) else record_error(index, decoded, read_id(raw))


_ndjson_record = msgspec.json.Decoder(Record)


async def ndjson_records(request: web.Request, max_line: int) -> AsyncIterator[Record | RecordError]:
    # Only each new chunk is searched for newlines; the unfinished line is kept as its
    # pieces and joined once, so a line sent in tiny chunks costs linear time.
    pending: list[bytes] = []
    pending_len = index = 0
    too_large = PayloadTooLarge(f"A stream record exceeds the limit of {max_line} bytes")
    async for chunk in iter_body(request):
        lines = chunk.split(b"\n")
        tail = lines.pop()
        if lines and pending:
            lines[0] = b"".join((*pending, lines[0]))
            pending, pending_len = [], 0
        for line in lines:
            if len(line) > max_line:
                raise too_large
            if line.strip():
                yield _record_or_error(index, _decode_line(line), line, _line_record_id)
                index += 1
        if tail:
            pending.append(tail)
            pending_len += len(tail)
            if pending_len > max_line:
                raise too_large
    line = b"".join(pending)
    if line.strip():
        yield _record_or_error(index, _decode_line(line), line, _line_record_id)


def _decode_line(line: bytes) -> Record | Exception:
    try:
        record: Record = _ndjson_record.decode(line)
        return record
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        return exc


async def msgpack_records(request: web.Request, max_record: int) -> AsyncIterator[Record | RecordError]:
    # The buffer holds at most one unfinished record and the chunk that follows it.
    unpacker = msgpack.Unpacker(
        raw=False,
        max_buffer_size=max_record + CHUNK,
        strict_map_key=False,
        object_pairs_hook=_map_or_marker,
    )
    index = fed = start = 0
    too_large = PayloadTooLarge(f"A stream record exceeds the limit of {max_record} bytes")
    try:
        async for chunk in iter_body(request):
            fed += len(chunk)
            unpacker.feed(chunk)
            for obj in unpacker:
                end = unpacker.tell()
                if end - start > max_record:
                    raise too_large
                start = end
                yield _record_or_error(index, _convert(obj), obj, _given_record_id)
                index += 1
            if fed - start > max_record:
                raise too_large
    except msgpack.BufferFull:
        raise too_large from None
    except (msgpack.UnpackException, ValueError) as exc:
        raise BadRequest(f"Stream is not valid msgpack after record {index}: {exc}") from None
    if unpacker.tell() != fed:
        raise BadRequest(f"Stream ends inside a msgpack record after record {index}")


class MapWithArrayOrMapKey:
    """Stands in for a msgpack map with an array or a map as a key: valid msgpack, but
    no Python dict can hold it, and no record has one."""

    __slots__ = ()


_MAP_WITH_UNHASHABLE_KEY = MapWithArrayOrMapKey()


def _map_or_marker(
    pairs: list[tuple[object, object]],
) -> dict[object, object] | MapWithArrayOrMapKey:
    # Raising here would leave the unpacker mid-object (it then yields stray values), so
    # such a map decodes to a marker that fails only its own record.
    try:
        return dict(pairs)
    except TypeError:
        return _MAP_WITH_UNHASHABLE_KEY


def _line_record_id(line: bytes) -> str | None:
    return given_record_id(line, Format.JSON)


def _given_record_id(obj: object) -> str | None:
    if not isinstance(obj, dict):
        return None
    try:
        return msgspec.convert(obj, RecordIdOnly).record_id
    except msgspec.ValidationError:
        return None


def _convert(obj: object) -> Record | Exception:
    if obj is _MAP_WITH_UNHASHABLE_KEY:
        return ValueError("a map key is an array or a map; record keys are strings")
    try:
        return msgspec.convert(obj, Record)
    except msgspec.ValidationError as exc:
        return exc
