"""Ingestion routes: ``POST /api/v2/ingest`` and ``POST /api/v2/ingest/stream``.

The handler decodes and validates, hands the accepted records to the record sink's
mailbox, and answers 202 only once the sink reports them durable.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator

import msgpack
import msgspec
from aiohttp import web

from schemas.ingest import IngestRequest, IngestResponse, Record, RecordError
from schemas.problem import FieldError
from service.appkeys import RECORD_SINK, RECORD_VALIDATOR, SETTINGS
from service.audit import audit_request
from service.body import iter_body, read_body
from service.codec import Format, location, request_format, respond
from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType, ValidationFailed
from service.openapi import Operation
from service.record_validation import ValidatedBatch

STREAM_CHUNK_RECORDS = 1000
MAX_REPORTED_ERRORS = 1000
NDJSON = "application/x-ndjson"
_SOURCE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

OPERATIONS = [
    Operation(
        "post",
        "/api/v2/ingest",
        "Ingest a batch of training records (partial success)",
        "ingestion",
        {202: IngestResponse},
        request=IngestRequest,
        scope="ingest",
        description=(
            "Each record is validated on its own; rejected records are listed in `errors` "
            "and the rest are written. 202 means every accepted record is durable "
            "(Kafka acks=all or fsync'd to the local log). All rejected: 422."
        ),
    ),
    Operation(
        "post",
        "/api/v2/ingest/stream",
        "Ingest a stream of records (NDJSON or concatenated msgpack maps)",
        "ingestion",
        {202: IngestResponse},
        request=Record,
        request_media=(NDJSON, "application/msgpack"),
        scope="ingest",
        parameters=[
            {"name": "source", "in": "query", "required": True, "schema": {"type": "string"}}
        ],
        description=(
            "The body is a sequence of Record documents: one JSON object per line, or "
            "msgpack maps back to back. Memory stays bounded whatever the length; one "
            "202 at the end. At most 1000 record errors are listed."
        ),
    ),
]


def _all_rejected(errors: list[RecordError]) -> ValidationFailed:
    return ValidationFailed(
        "Every record of the batch was rejected; nothing was written",
        errors=[
            FieldError(loc=f"records[{e.index}]", msg=e.error, index=e.index, record_id=e.record_id)
            for e in errors
        ],
    )


async def _write(request: web.Request, batch: ValidatedBatch, tracking_id: str) -> None:
    records = request.app[RECORD_VALIDATOR].outbound(batch, tracking_id)
    await request.app[RECORD_SINK].write(records)


async def ingest(request: web.Request) -> web.Response:
    """Validate a batch of records and write the good ones durably (partial success)."""
    settings = request.app[SETTINGS]
    fmt = request_format(request)
    body = await read_body(request, settings.max_body_bytes)
    validator = request.app[RECORD_VALIDATOR]
    source, items = validator.decode_batch(body, fmt)
    batch = validator.validate(source, items)
    if not batch.accepted:
        audit_request(request, "ingest", "rejected", source=source, records_rejected=len(batch.errors))
        raise _all_rejected(batch.errors)
    tracking_id = uuid.uuid4().hex
    try:
        await _write(request, batch, tracking_id)
    except Exception as exc:
        audit_request(
            request, "ingest", f"failed: {type(exc).__name__}", source=source,
            tracking_id=tracking_id, records_accepted=0, records_rejected=len(batch.errors),
        )
        raise
    audit_request(
        request, "ingest", "accepted", source=source, tracking_id=tracking_id,
        records_accepted=len(batch.accepted), records_rejected=len(batch.errors),
    )
    answer = IngestResponse(
        tracking_id=tracking_id,
        records_accepted=len(batch.accepted),
        records_rejected=len(batch.errors),
        records_duplicate=0,
        errors=batch.errors,
    )
    return respond(request, answer, status=202)


async def ingest_stream(request: web.Request) -> web.Response:
    """Ingest NDJSON or concatenated msgpack records, chunk by chunk, in bounded memory."""
    settings = request.app[SETTINGS]
    source = request.query.get("source", "")
    if not _SOURCE.match(source):
        raise ValidationFailed(
            "Query parameter source is required: 1-128 of A-Z a-z 0-9 . _ : -",
            errors=[FieldError(loc="query.source", msg="missing or invalid")],
        )
    if request.content_type == NDJSON:
        records = _ndjson_records(request, settings.max_stream_record_bytes)
    elif request_format(request, default=None) is Format.MSGPACK:
        records = _msgpack_records(request, settings.max_stream_record_bytes)
    else:
        raise UnsupportedMediaType("Use application/x-ndjson or application/msgpack for streams")

    validator = request.app[RECORD_VALIDATOR]
    tracking_id = uuid.uuid4().hex
    accepted = rejected = 0
    errors: list[RecordError] = []
    chunk: list[Record | RecordError] = []
    offset = 0

    async def flush() -> None:
        nonlocal accepted, rejected, offset
        batch = validator.validate(source, chunk)
        for error in batch.errors:
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(
                    RecordError(index=error.index + offset, record_id=error.record_id, error=error.error)
                )
        rejected += len(batch.errors)
        if batch.accepted:
            await _write(request, batch, tracking_id)
            accepted += len(batch.accepted)
        offset += len(chunk)
        chunk.clear()

    async for item in records:
        chunk.append(item)
        if len(chunk) >= STREAM_CHUNK_RECORDS:
            await flush()
    if chunk:
        await flush()
    if offset == 0:
        raise ValidationFailed("The stream holds no records", errors=[FieldError(loc="body", msg="empty")])
    audit_request(
        request, "ingest_stream", "accepted" if accepted else "rejected", source=source,
        tracking_id=tracking_id, records_accepted=accepted, records_rejected=rejected,
    )
    if accepted == 0:
        raise _all_rejected(errors)
    answer = IngestResponse(
        tracking_id=tracking_id,
        records_accepted=accepted,
        records_rejected=rejected,
        records_duplicate=0,
        errors=errors,
    )
    return respond(request, answer, status=202)


def _record_or_error(index: int, decoded: Record | Exception) -> Record | RecordError:
    if isinstance(decoded, Record):
        return decoded
    if isinstance(decoded, msgspec.ValidationError):
        loc, msg = location(decoded)
        return RecordError(index=index, record_id=None, error=f"{msg} at {loc}" if loc else msg)
    return RecordError(index=index, record_id=None, error=f"undecodable record: {decoded}")


_ndjson_record = msgspec.json.Decoder(Record)


async def _ndjson_records(request: web.Request, max_line: int) -> AsyncIterator[Record | RecordError]:
    buffer = b""
    index = 0
    async for chunk in iter_body(request):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        if len(buffer) > max_line:
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


async def _msgpack_records(request: web.Request, max_record: int) -> AsyncIterator[Record | RecordError]:
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max_record, strict_map_key=False)
    index = fed = 0
    try:
        async for chunk in iter_body(request):
            fed += len(chunk)
            unpacker.feed(chunk)
            for obj in unpacker:
                yield _record_or_error(index, _convert(obj))
                index += 1
    except msgpack.BufferFull:
        raise PayloadTooLarge(f"A stream record exceeds the limit of {max_record} bytes") from None
    except (msgpack.UnpackException, ValueError) as exc:
        raise BadRequest(f"Stream is not valid msgpack after record {index}: {exc}") from None
    if unpacker.tell() != fed:
        raise BadRequest(f"Stream ends inside a msgpack record after record {index}")


def _convert(obj: object) -> Record | Exception:
    try:
        return msgspec.convert(obj, Record)
    except msgspec.ValidationError as exc:
        return exc


def setup(app: web.Application) -> None:
    app.router.add_post("/api/v2/ingest", ingest)
    app.router.add_post("/api/v2/ingest/stream", ingest_stream)
