"""Ingestion routes: ``POST /api/v2/ingest`` and ``POST /api/v2/ingest/stream``.

The handler decodes and validates, hands the accepted records to the record sink's
mailbox, and answers 202 only once the sink reports them durable.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import msgpack
import msgspec
from aiohttp import web

from mlgate.schemas.ingest import IngestRequest, IngestResponse, Record, RecordError, SourceName
from mlgate.schemas.problem import FieldError
from mlgate.service.http.body import CHUNK, iter_body, read_body
from mlgate.service.http.codec import Format, location, request_format, respond
from mlgate.service.http.errors import (
    ApiError,
    BadRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
)
from mlgate.service.http.openapi import Operation
from mlgate.service.ingest.dedup import Claim
from mlgate.service.ingest.validation import ValidatedBatch
from mlgate.service.protection.audit import audit_request
from mlgate.service.state import (
    METRICS,
    RECORD_DEDUP,
    RECORD_SINK,
    RECORD_VALIDATOR,
    SETTINGS,
    TENANT,
)

STREAM_CHUNK_RECORDS = 1000
MAX_REPORTED_ERRORS = 1000
NDJSON = "application/x-ndjson"

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
            {
                "name": "source",
                "in": "query",
                "required": True,
                "schema": msgspec.json.schema(SourceName),
            }
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


async def _write(
    request: web.Request, batch: ValidatedBatch, tracking_id: str, items: list[Record | RecordError]
) -> int:
    """Write the accepted records whose record_id was not seen within the dedup window;
    return how many were such duplicates (not written)."""
    fresh, claim = await _drop_duplicates(request, batch, items)
    dedup = request.app[RECORD_DEDUP]
    if fresh.accepted:
        try:
            records = request.app[RECORD_VALIDATOR].outbound(fresh, tracking_id)
            await request.app[RECORD_SINK].write(records)
        except BaseException:
            if claim is not None:
                await asyncio.shield(dedup.release(_tenant(request), claim))
            raise
    if claim is not None:
        # Written: a cancellation now must not leave the ids to lapse and be written again.
        await asyncio.shield(dedup.confirm(_tenant(request), claim))
    duplicates = len(batch.accepted) - len(fresh.accepted)
    if duplicates:
        request.app[METRICS].records_duplicate.inc(duplicates)
    return duplicates


def _tenant(request: web.Request) -> str:
    return request.get(TENANT) or "anonymous"


async def _drop_duplicates(
    request: web.Request, batch: ValidatedBatch, items: list[Record | RecordError]
) -> tuple[ValidatedBatch, Claim | None]:
    """The batch without records already written (by client-given record_id), and the
    claim on the rest. Generated ids are unique and not tracked."""
    dedup = request.app[RECORD_DEDUP]
    if not dedup.enabled:
        return batch, None
    given = {item.record_id for item in items if isinstance(item, Record) and item.record_id}
    tracked = [record.record_id for record in batch.accepted if record.record_id in given]
    if not tracked:
        return batch, None
    claim = await dedup.claim(_tenant(request), tracked)
    if all(claim.new):
        return batch, claim
    keep, new = [], iter(claim.new)
    for record in batch.accepted:
        if record.record_id not in given or next(new):
            keep.append(record)
    fresh = ValidatedBatch(
        source=batch.source, accepted=keep, errors=batch.errors, quality_flags=batch.quality_flags
    )
    return fresh, claim


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
        duplicates = await _write(request, batch, tracking_id, items)
    except Exception as exc:
        audit_request(
            request, "ingest", f"failed: {type(exc).__name__}", source=source,
            tracking_id=tracking_id, records_accepted=0, records_rejected=len(batch.errors),
        )
        raise
    audit_request(
        request, "ingest", "accepted", source=source, tracking_id=tracking_id,
        records_accepted=len(batch.accepted) - duplicates, records_rejected=len(batch.errors),
        records_duplicate=duplicates,
    )
    answer = IngestResponse(
        tracking_id=tracking_id,
        records_accepted=len(batch.accepted) - duplicates,
        records_rejected=len(batch.errors),
        records_duplicate=duplicates,
        errors=batch.errors,
    )
    return respond(request, answer, status=202)


async def ingest_stream(request: web.Request) -> web.Response:
    """Ingest NDJSON or concatenated msgpack records, chunk by chunk, in bounded memory."""
    settings = request.app[SETTINGS]
    source = request.query.get("source", "")
    try:
        msgspec.convert(source, SourceName)
    except msgspec.ValidationError:
        raise ValidationFailed(
            "Query parameter source is required: 1-128 of A-Z a-z 0-9 . _ : -",
            errors=[FieldError(loc="query.source", msg="missing or invalid")],
        ) from None
    if request.content_type == NDJSON:
        records = _ndjson_records(request, settings.max_stream_record_bytes)
    elif request_format(request, default=None) is Format.MSGPACK:
        records = _msgpack_records(request, settings.max_stream_record_bytes)
    else:
        raise UnsupportedMediaType("Use application/x-ndjson or application/msgpack for streams")

    validator = request.app[RECORD_VALIDATOR]
    tracking_id = uuid.uuid4().hex
    accepted = rejected = duplicate = 0
    errors: list[RecordError] = []
    chunk: list[Record | RecordError] = []
    offset = 0

    async def flush() -> None:
        nonlocal accepted, rejected, duplicate, offset
        batch = validator.validate(source, chunk)
        for error in batch.errors:
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(
                    RecordError(index=error.index + offset, record_id=error.record_id, error=error.error)
                )
        rejected += len(batch.errors)
        if batch.accepted:
            duplicates = await _write(request, batch, tracking_id, chunk)
            accepted += len(batch.accepted) - duplicates
            duplicate += duplicates
        offset += len(chunk)
        chunk.clear()

    try:
        async for item in records:
            chunk.append(item)
            if len(chunk) >= STREAM_CHUNK_RECORDS:
                await flush()
        if chunk:
            await flush()
    except Exception as exc:
        audit_request(
            request, "ingest_stream", f"failed: {type(exc).__name__}", source=source,
            tracking_id=tracking_id, records_accepted=accepted, records_rejected=rejected,
            records_duplicate=duplicate,
        )
        if accepted and isinstance(exc, ApiError):
            # The client must learn that part of its stream is already durable.
            exc.detail = (
                f"{exc.detail}. The first {accepted} records accepted from this stream were "
                f"written (tracking_id {tracking_id}); resending them with the same "
                "record_id counts them as duplicates, not twice."
            )
        raise
    if offset == 0:
        raise ValidationFailed("The stream holds no records", errors=[FieldError(loc="body", msg="empty")])
    audit_request(
        request, "ingest_stream", "accepted" if accepted or duplicate else "rejected",
        source=source, tracking_id=tracking_id, records_accepted=accepted,
        records_rejected=rejected, records_duplicate=duplicate,
    )
    if accepted == 0 and duplicate == 0:
        raise _all_rejected(errors)
    answer = IngestResponse(
        tracking_id=tracking_id,
        records_accepted=accepted,
        records_rejected=rejected,
        records_duplicate=duplicate,
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


async def _msgpack_records(request: web.Request, max_record: int) -> AsyncIterator[Record | RecordError]:
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


def setup(app: web.Application) -> None:
    app.router.add_post("/api/v2/ingest", ingest)
    app.router.add_post("/api/v2/ingest/stream", ingest_stream)
