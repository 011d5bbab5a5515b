"""Ingestion routes: ``POST /api/v2/ingest`` and ``POST /api/v2/ingest/stream``.

Handlers only: each reads the body, runs it through the ``IngestPipeline``
(``service.ingest.pipeline`` says what a 202 means), audits and answers.
"""

from __future__ import annotations

import asyncio
import re
from enum import Enum

import msgspec
from aiohttp import web

from mlgate.schemas.ingest import IngestRequest, IngestResponse, Record, RecordError, SourceName
from mlgate.schemas.problem import FieldError, RecordFieldError
from mlgate.service.http.body import read_body
from mlgate.service.http.codec import MEDIA_TYPES, Format, media_type, request_format, respond
from mlgate.service.http.context import TENANT, WORK_BEGAN
from mlgate.service.http.errors import (
    ApiError,
    UnsupportedMediaType,
    ValidationFailed,
)
from mlgate.service.http.front_door import as_api_error, error_log
from mlgate.service.http.routing import Route
from mlgate.service.ingest.dedup import RecordDeduplicator
from mlgate.service.ingest.pipeline import IngestPipeline, refused
from mlgate.service.ingest.streams import msgpack_records, ndjson_records
from mlgate.service.ingest.validation import dimension_error
from mlgate.service.protection.audit import Caller, audit_call, audit_request
from mlgate.service.state import DRAINING, INGEST_PIPELINE, SETTINGS
from mlgate.workers.breaker import BreakerOpen
from mlgate.workers.errors import SinkFailed, WorkerError

STREAM_CHUNK_RECORDS = 1000
MAX_REPORTED_ERRORS = 1000
NDJSON = "application/x-ndjson"
PATH = "/api/v2/ingest"


# The field a record's error names: msgspec's end in "at <field>" (``record_error``), the
# validator's own begin with it ("features has 3 values", "metadata['fw'] is ...").
_ERROR_FIELD = re.compile(
    r" at ([A-Za-z_][\w.\[\]]*)$|^(features|label|metadata|timestamp|record_id)\b"
)


# A metadata item named by its key (``record_error``): located at ``metadata``.
_NAMED_KEY = re.compile(r"\[(?:'.*'|\".*\")\]$")


def _loc(error: RecordError) -> str:
    """``records[i].<field>`` where the error names its field, else ``records[i]``."""
    found = _ERROR_FIELD.search(_NAMED_KEY.sub("", error.error))
    # msgspec says "metadata[...]" for a value under some key: the field is metadata.
    field = None if found is None else (found.group(1) or found.group(2)).replace("[...]", "")
    return f"records[{error.index}].{field}" if field else f"records[{error.index}]"


def _field_error(error: RecordError) -> RecordFieldError:
    return RecordFieldError(
        loc=_loc(error), msg=error.error, index=error.index, record_id=error.record_id, error=error.error
    )


def _all_rejected(errors: list[RecordError], what: str = "batch") -> ValidationFailed:
    """422 for a batch (or a stream: a review read "the batch" of one) of which every
    record was rejected; each error located as ``records[i]``, the i-th record sent."""
    return ValidationFailed(
        f"Every record of the {what} was rejected; nothing was written",
        errors=list(map(_field_error, errors)),
    )


def _tenant(request: web.Request) -> str:
    return request.get(TENANT) or "anonymous"


async def ingest(request: web.Request) -> web.Response:
    """Validate a batch of records and write the good ones durably (partial success)."""
    settings = request.app[SETTINGS]
    fmt = request_format(request)
    body = await read_body(request, settings.max_body_bytes)
    answer = await ingest_batch(request.app[INGEST_PIPELINE], body, fmt, Caller.of(request))
    return respond(request, answer, status=202)


async def ingest_batch(
    pipeline: IngestPipeline, body: bytes, fmt: Format, caller: Caller
) -> IngestResponse:
    """The 202's answer for a batch ``body``: decoded, validated, the good records
    written durably and the outcome audited. Shared with the express lane
    (service/process/express.py), so both answer alike."""
    tenant = caller.tenant or "anonymous"
    try:
        pipeline.admit(tenant)  # before the decoding a refusal would waste
    except WorkerError as exc:
        audit_call(caller, "ingest", f"refused: {type(exc).__name__}", records_accepted=0)
        raise
    source, items = pipeline.decode(body, fmt)
    try:
        held = pipeline.hold(items, tenant)
    except WorkerError as exc:
        audit_call(caller, "ingest", f"refused: {type(exc).__name__}", source=source, records_accepted=0)
        raise
    try:
        try:
            batch = pipeline.validate(source, items)
        except ApiError as exc:  # the source refused whole (its quality profile unreadable)
            audit_call(caller, "ingest", f"refused: {type(exc).__name__}", source=source, records_accepted=0)
            raise
        if not batch.accepted:
            pipeline.observe_unwritten(batch)
            audit_call(caller, "ingest", "rejected", source=source, records_rejected=len(batch.errors))
            raise _all_rejected(batch.errors)
        tracking_id = pipeline.new_tracking_id()
        try:
            written = await pipeline.write(tenant, batch, tracking_id)
        except Exception as exc:
            audit_call(
                caller, "ingest", f"failed: {type(exc).__name__}", source=source,
                tracking_id=tracking_id, records_accepted=0, records_rejected=len(batch.errors),
            )
            if isinstance(exc, WorkerError) and not refused(exc):
                # Kafka was tried and did not answer: the client must not read this
                # 503 as "nothing happened" (a review: its resend landed twice). Still
                # the sink's failure, answered by the front door as any other.
                raise SinkFailed(
                    f"{exc}. Records of this batch may have been written (tracking_id "
                    f"{tracking_id}): "
                    f"{_resend_of_unknown(pipeline.claim_lapse_s, _dedup_reach(pipeline.dedup, False))}"
                ) from exc
            raise
    finally:
        pipeline.release(held, tenant)
    audit_call(
        caller, "ingest", "accepted", source=source, tracking_id=tracking_id,
        records_accepted=written.accepted, records_rejected=len(batch.errors),
        records_duplicate=written.duplicates,
    )
    return IngestResponse(
        tracking_id=tracking_id,
        records_accepted=written.accepted,
        records_rejected=len(batch.errors),
        records_duplicate=written.duplicates,
        errors=batch.errors,
    )


def stream_head(request: web.Request) -> tuple[str, str]:
    """A stream's source and media type, as its head gives them: 422 for a missing or
    invalid source, 415 for a body that is neither NDJSON nor msgpack. A body sent as
    ``application/json`` is read as NDJSON (its lines JSON records, one record in all
    for most such bodies): every body-carrying endpoint takes JSON (the contract),
    and many clients name an NDJSON body so (a review: 415)."""
    sources = request.query.getall("source", [""])
    source = sources[0]
    if len(sources) > 1:
        # Which would the records be of? (a review: the first was taken silently)
        raise ValidationFailed(
            "Query parameter source is given more than once",
            errors=[FieldError(loc="query.source", msg="given more than once")],
        )
    try:
        msgspec.convert(source, SourceName)
    except msgspec.ValidationError:
        raise ValidationFailed(
            "Query parameter source is required: 1-128 of A-Z a-z 0-9 . _ : -",
            errors=[FieldError(loc="query.source", msg="missing or invalid")],
        ) from None
    named = media_type(request.headers.get("Content-Type"))
    if MEDIA_TYPES.get(named) is Format.JSON:
        return source, named
    if named != NDJSON and MEDIA_TYPES.get(named) is not Format.MSGPACK:
        raise UnsupportedMediaType(
            f"Content-Type {named[:100] or 'missing'!r} is not a stream: use {NDJSON} "
            "(one JSON record a line; application/json is read so too) or "
            "application/msgpack (concatenated maps)"
        )
    return source, named


# A stream holds its decoded records against the held-values bound in groups of about
# this many feature values (one largest record), and writes its chunk early once it
# holds this share of the bound: many streams of large records fit the bound at once.
STREAM_HOLD_GROUP_VALUES = 4096
STREAM_CHUNK_SHARE = 16
# A stream's records are decoded and checked between reads that need not wait (a
# compressed body, or one that came fast): every TURN_CHECK_RECORDS records, the loop
# gets a turn if TURN_S passed since the last (a review: 16 KB of gzip holding 8M
# one-byte records kept /health waiting 2 s at a time).
TURN_CHECK_RECORDS = 64
TURN_S = 0.005
# A stream stops (422, saying what was written) once its rejected records outnumber its
# accepted and duplicate ones by this many: a review's 1 KB of gzip held a million
# msgpack nils, each a rejected record, and took 12 s of the loop; a stream of mostly
# good records goes on, and so does its resend, whose good records are duplicates. As
# a bulk loader's bound on bad records (BigQuery's ``maxBadRecords``).
STREAM_MAX_REJECTED_LEAD = 10_000


async def ingest_stream(request: web.Request) -> web.Response:
    """Ingest NDJSON or concatenated msgpack records, chunk by chunk, in bounded memory.

    The decoded records count against the held-values bound as they come (a review:
    six idle streams of 999 records of 4096 features took 900 MB while the bound saw
    none), a group at a time; past it the stream ends with the 503 a batch gets. A
    record of a dimension not allowed is rejected as it comes, its features let go."""
    settings = request.app[SETTINGS]
    source, media_type = stream_head(request)
    pipeline = request.app[INGEST_PIPELINE]
    tenant = _tenant(request)
    try:
        pipeline.admit(tenant)  # before any of the body is read
    except WorkerError as exc:
        audit_request(
            request, "ingest_stream", f"refused: {type(exc).__name__}", source=source,
            records_accepted=0,
        )
        raise
    if MEDIA_TYPES.get(media_type) is Format.MSGPACK:
        records = msgpack_records(request, settings.max_stream_record_bytes)
    else:
        records = ndjson_records(
            request, settings.max_stream_record_bytes, sent_as_json=media_type != NDJSON
        )
    dims = frozenset(settings.feature_dims)
    flush_at = max(1, settings.ingest_max_held_values // STREAM_CHUNK_SHARE)
    group_at = min(STREAM_HOLD_GROUP_VALUES, flush_at)

    tracking_id = pipeline.new_tracking_id()
    accepted = rejected = duplicate = 0
    errors: list[RecordError] = []
    chunk: list[Record | RecordError] = []
    offset = 0
    held = unheld = held_upto = 0  # values held; of chunk[held_upto:], not yet held
    writing = 0  # records of the chunk being written, while its write is awaited
    loop = asyncio.get_running_loop()
    turn_due = loop.time() + TURN_S

    def hold_rest() -> None:
        nonlocal held, unheld, held_upto
        held += pipeline.hold(chunk[held_upto:], tenant)
        unheld, held_upto = 0, len(chunk)

    async def flush() -> None:
        nonlocal accepted, rejected, duplicate, offset, held, held_upto, writing
        hold_rest()
        batch = pipeline.validate(source, chunk)
        for error in batch.errors:
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(
                    RecordError(index=error.index + offset, record_id=error.record_id, error=error.error)
                )
        if batch.accepted:
            writing = len(chunk)
            request[WORK_BEGAN] = True  # a failure from here on is kept for a repeat
            written = await pipeline.write(tenant, batch, tracking_id)
            writing = 0
            accepted += written.accepted
            duplicate += written.duplicates
        else:
            pipeline.observe_unwritten(batch)
        # Counted once the chunk is taken in: a failure's detail counts the records
        # before the chunk (a review: 15 rejected of a 1,000 that had 5).
        rejected += len(batch.errors)
        pipeline.release(held, tenant)
        held = held_upto = 0
        offset += len(chunk)
        chunk.clear()
        if rejected - accepted - duplicate > STREAM_MAX_REJECTED_LEAD:
            raise ValidationFailed(
                f"The stream was stopped at record {offset}: its rejected records outnumber "
                f"its accepted ones by more than {STREAM_MAX_REJECTED_LEAD}",
                errors=[FieldError(loc="body", msg="too many rejected records")],
            )

    try:
        async for item in records:
            if isinstance(item, Record):
                values = len(item.features)
                if values not in dims:
                    item = _wrong_dimension(item, dims, offset + len(chunk))
                else:
                    unheld += values
            chunk.append(item)
            if not len(chunk) % TURN_CHECK_RECORDS and loop.time() >= turn_due:
                await asyncio.sleep(0)
                turn_due = loop.time() + TURN_S
            if unheld >= group_at:
                hold_rest()
            if len(chunk) >= STREAM_CHUNK_RECORDS or held >= flush_at:
                await flush()
        if chunk:
            await flush()
    except Exception as exc:
        audit_request(
            request, "ingest_stream", f"failed: {type(exc).__name__}", source=source,
            tracking_id=tracking_id, records_accepted=accepted, records_rejected=rejected,
            records_duplicate=duplicate,
        )
        if isinstance(exc, ConnectionError):
            raise  # the client went away: nobody is left to tell
        if not isinstance(exc, ApiError | WorkerError | BreakerOpen | web.HTTPException):
            error_log.exception("unhandled_error", path=request.path)
        # The client must learn which part of its stream is already durable (a review:
        # a stream refused part-way, or failed by a fault of ours, said nothing).
        error = as_api_error(exc, settings.retry_after_s)
        # A sink's failure other than a refusal may come after some records landed;
        # one of ours before the records were handed on (their encoding) may not.
        unknown = writing if writing and isinstance(exc, WorkerError) and not refused(exc) else 0
        error.detail = _partly_written(
            error, accepted, duplicate, rejected, offset, tracking_id, unknown,
            settings.idempotency_lock_s,
            _dedup_reach(pipeline.dedup, request.app[DRAINING].is_set()),
        )
        if errors:  # the records rejected before it, to fix before resending them
            error.errors = [*(error.errors or ()), *map(_field_error, errors)]
        if error is not exc:
            raise error from exc
        raise
    finally:
        pipeline.release(held, tenant)
    if offset == 0:
        raise ValidationFailed("The stream holds no records", errors=[FieldError(loc="body", msg="empty")])
    audit_request(
        request, "ingest_stream", "accepted" if accepted or duplicate else "rejected",
        source=source, tracking_id=tracking_id, records_accepted=accepted,
        records_rejected=rejected, records_duplicate=duplicate,
    )
    if accepted == 0 and duplicate == 0:
        raise _all_rejected(errors, "stream")
    answer = IngestResponse(
        tracking_id=tracking_id,
        records_accepted=accepted,
        records_rejected=rejected,
        records_duplicate=duplicate,
        errors=errors,
    )
    return respond(request, answer, status=202)


def _wrong_dimension(record: Record, dims: frozenset[int], index: int) -> RecordError:
    """The rejection ``RecordValidator`` gives a record of a dimension not allowed,
    made as it comes so that its features are not kept."""
    return RecordError(
        index=index, record_id=record.record_id, error=dimension_error(len(record.features), dims)
    )


class DedupReach(Enum):
    """Where a resend of records already written is caught as duplicates: the answer
    to a stream cut short says which (a review: after SIGTERM, without Redis, it said
    a resend counted as duplicates, and the next process wrote all of them again)."""

    SHARED = "shared"  # in Redis: any process, within the window
    THIS_PROCESS = "this process"  # without Redis: this process only, within the window
    NOWHERE = "nowhere"  # dedup off, or this process stopping without Redis


def _dedup_reach(dedup: RecordDeduplicator, stopping: bool) -> DedupReach:
    if not dedup.enabled:
        return DedupReach.NOWHERE
    if dedup.shared:
        return DedupReach.SHARED
    return DedupReach.NOWHERE if stopping else DedupReach.THIS_PROCESS


def _partly_written(
    error: ApiError, accepted: int, duplicate: int, rejected: int, offset: int,
    tracking_id: str, unknown: int = 0, lock_s: float = 0.0,
    reach: DedupReach = DedupReach.SHARED,
) -> str:
    """``error``'s detail, with what the stream's records before it became: the chunks
    taken in (the first ``offset`` records) are written, duplicates or rejected; the
    ``unknown`` records after them were being written when it came, and the sink may
    hold some (their ids stay claimed for ``lock_s``, where ``reach`` says); the
    records after those, even those read before the error, are not written."""
    detail = error.detail or error.title
    if offset == 0 and not unknown:
        return f"{detail}. No record of this stream was written."
    done = (
        f"The first {accepted} records accepted from this stream were written "
        f"(tracking_id {tracking_id}): of its records 0 to {offset - 1}, {accepted} were "
        f"written, {duplicate} were duplicates and {rejected} were rejected; "
        if offset
        else ""
    )
    if unknown:
        last = offset + unknown - 1
        return (
            f"{detail}. {done}records {offset} to {last} were being written when it failed "
            f"and some may have landed (tracking_id {tracking_id}): "
            f"{_resend_of_unknown(lock_s, reach)} No record from index {last + 1} on was written."
        )
    return f"{detail}. {done}no record from index {offset} on was written. Resend from there{_RESEND[reach]}"


_RESEND = {
    DedupReach.SHARED: (
        ": resending records with the same record_id within the dedup window counts "
        "them as duplicates, not twice, in any process on the same Redis (but the ids "
        "this process kept to itself: past the tenant's "
        "MLGATE_DEDUP_REDIS_TENANT_MAX_IDS, or written while Redis failed)."
    ),
    DedupReach.THIS_PROCESS: (
        ": resending records with the same record_id to this process within the dedup "
        "window counts them as duplicates; without REDIS_URL another process, or this "
        "one restarted, writes them again."
    ),
    DedupReach.NOWHERE: (
        "; records resent that were written are written again (record-id dedup is off, "
        "or lives in this process, which is stopping: no REDIS_URL)."
    ),
}


def _resend_of_unknown(lock_s: float, reach: DedupReach) -> str:
    """What resending records that may have landed does: mlgate cannot tell whether
    Kafka took them, so a resend after their claims lapse writes them again."""
    where = "" if reach is DedupReach.SHARED else " (in this process only: no REDIS_URL)"
    held = (
        f"their record_ids stay claimed for {lock_s:g} s{where}, so a resend of them "
        "is 409 until then; after that "
        if lock_s and reach is not DedupReach.NOWHERE
        else ""
    )
    return (
        f"{held}a resend writes them again, and Kafka then holds twice any that had "
        "landed (keyed by the same record_id, for consumers to drop the copy)."
    )


ROUTES = [
    Route(
        "post",
        PATH,
        ingest,
        "Ingest a batch of training records (partial success)",
        "ingestion",
        {202: IngestResponse},
        request=IngestRequest,
        scope="ingest",
        body_media=request_format,
        description=(
            "Each record is validated on its own; rejected records are listed in `errors` "
            "and the rest are written. 202 means every accepted record is durable "
            "(Kafka acks=all or fsync'd to the local log). All rejected: 422."
        ),
    ),
    Route(
        "post",
        "/api/v2/ingest/stream",
        ingest_stream,
        "Ingest a stream of records (NDJSON or concatenated msgpack maps)",
        "ingestion",
        {202: IngestResponse},
        request=Record,
        request_media=(NDJSON, "application/json", "application/msgpack", "application/x-msgpack"),
        streams_body=True,
        body_media=stream_head,
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
            "202 at the end. At most 1000 record errors are listed. With an "
            "Idempotency-Key the stream is read whole first, to fingerprint it: it is then "
            "held to MLGATE_MAX_BODY_BYTES (413 past it), as any body is."
        ),
    ),
]
