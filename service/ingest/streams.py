"""Record streams: NDJSON lines or concatenated msgpack maps, decoded one record at a time.

Each yields, per record, the decoded ``Record`` or its ``RecordError`` (a bad record
costs only itself: so does a msgpack map keyed by an array or a map, valid msgpack that
no record can be); a record over ``max_stream_record_bytes`` is 413 and bytes that
are not msgpack at all are 400, as is a stream that ends inside a record. Memory
holds at most one unfinished record and the chunk after it, whatever the stream's
length: a msgpack record decodes into no larger container than a record has (its
features, its metadata), and no decoded value outlives its record. The route counts
the records against the held-values bound as they come (``routes.ingest``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack
import msgspec
from aiohttp import web

from mlgate.schemas.ingest import (
    Record,
    RecordError,
    RecordIdOnly,
    Timestamp,
)
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


# msgpack-python's decoding stack: a value nested this deep cannot be decoded.
MSGPACK_MAX_DEPTH = 1023


async def msgpack_records(request: web.Request, max_record: int) -> AsyncIterator[Record | RecordError]:
    # The buffer holds at most one unfinished record and the chunk that follows it.
    unpacker = msgpack.Unpacker(
        raw=False,
        # No container or string limit of its own (msgpack derives them from the
        # buffer): a field over a record's limit is that record's rejection, as on the
        # batch route. A record of a million empty arrays decodes into ~70 MB for the
        # moment of its conversion; it is let go before the stream waits for more.
        max_buffer_size=max_record + CHUNK,
        strict_map_key=False,
        object_pairs_hook=_map_or_marker,
    )
    # ``start``: where the last whole record ended. ``unpacker.tell()`` also counts the
    # bytes of a record still being decoded, so it cannot tell a stream cut mid-record.
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
                item = _record_or_error(index, _convert(obj), obj, _given_record_id)
                # Nothing of the decoded value stays referenced while the stream waits.
                obj = None
                yield item
                del item
                index += 1
            if fed - start > max_record:
                raise too_large
    except msgpack.BufferFull:
        raise too_large from None
    except (msgpack.UnpackException, ValueError) as exc:
        # msgpack records have no boundary to resume from: the stream ends here.
        raise BadRequest(
            f"Stream is not valid msgpack after record {index}: {_unpack_problem(exc)}"
        ) from None
    if start != fed:
        raise BadRequest(
            f"Stream ends inside a msgpack record after record {index}: the last "
            f"{fed - start} bytes are not a whole record"
        )


def _unpack_problem(exc: Exception) -> str:
    """What msgpack-python found wrong, in words: some of its errors have none."""
    if isinstance(exc, msgpack.StackError):
        return f"arrays or maps nested more than {MSGPACK_MAX_DEPTH} deep"
    if isinstance(exc, msgpack.FormatError):
        return "a byte that starts no msgpack value (0xc1)"
    problem = str(exc) or type(exc).__name__
    if "exceeds max_" in problem:
        # An array or map header claiming more entries than a whole record may hold.
        return f"{problem}: more than a stream record's bytes could hold"
    return problem


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
    if isinstance(obj, dict) and isinstance(stamp := obj.get("timestamp"), msgpack.Timestamp):
        # The msgpack timestamp extension, which the batch route takes (msgspec decodes
        # it): read by msgspec too, so the time stored, and the error for one out of
        # range, are the batch's.
        try:
            obj["timestamp"] = _stamp_decoder.decode(_STAMP_MAP + msgpack.packb(stamp)).timestamp
        except msgspec.ValidationError as exc:
            return exc
    try:
        return msgspec.convert(obj, Record)
    except msgspec.ValidationError as exc:
        return exc


class _StampOnly(msgspec.Struct, frozen=True, gc=False):
    timestamp: Timestamp


_stamp_decoder = msgspec.msgpack.Decoder(_StampOnly)
_STAMP_MAP = b"\x81" + msgpack.packb("timestamp")
