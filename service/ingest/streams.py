"""Record streams: NDJSON lines or concatenated msgpack maps, decoded one record at a time.

Each yields, per record, the decoded ``Record`` or its ``RecordError`` (a bad record
costs only itself); a record over ``max_stream_record_bytes`` is 413 and bytes that
are not msgpack at all are 400. Memory holds at most one unfinished record and the
chunk after it, whatever the stream's length.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgpack
import msgspec
from aiohttp import web

from mlgate.schemas.ingest import Record, RecordError
from mlgate.service.http.body import CHUNK, iter_body
from mlgate.service.http.errors import BadRequest, PayloadTooLarge
from mlgate.service.ingest.validation import record_error


def _record_or_error(index: int, decoded: Record | Exception) -> Record | RecordError:
    return decoded if isinstance(decoded, Record) else record_error(index, decoded)


_ndjson_record = msgspec.json.Decoder(Record)


async def ndjson_records(request: web.Request, max_line: int) -> AsyncIterator[Record | RecordError]:
    buffer = b""
    index = 0
    async for chunk in iter_body(request):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        if len(buffer) > max_line or any(len(line) > max_line for line in lines):
            raise PayloadTooLarge(f"A stream record exceeds the limit of {max_line} bytes")
        for line in lines:
            if line.strip():
                yield _record_or_error(index, _decode_line(line))
                index += 1
    if buffer.strip():
        yield _record_or_error(index, _decode_line(buffer))


def _decode_line(line: bytes) -> Record | Exception:
    try:
        record: Record = _ndjson_record.decode(line)
        return record
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        return exc


async def msgpack_records(request: web.Request, max_record: int) -> AsyncIterator[Record | RecordError]:
    # The buffer holds at most one unfinished record and the chunk that follows it.
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max_record + CHUNK, strict_map_key=False)
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
                yield _record_or_error(index, _convert(obj))
                index += 1
            if fed - start > max_record:
                raise too_large
    except msgpack.BufferFull:
        raise too_large from None
    except (msgpack.UnpackException, ValueError) as exc:
        raise BadRequest(f"Stream is not valid msgpack after record {index}: {exc}") from None
    if unpacker.tell() != fed:
        raise BadRequest(f"Stream ends inside a msgpack record after record {index}")


def _convert(obj: object) -> Record | Exception:
    try:
        return msgspec.convert(obj, Record)
    except msgspec.ValidationError as exc:
        return exc
