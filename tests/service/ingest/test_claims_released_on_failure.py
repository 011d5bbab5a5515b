"""A failure of ours after the dedup claims are taken, before the records are handed
to the sink, releases the claims: a resend is written, not 409 for the claim's lapse.
A stream failed so says, in its 500, which part of it was written."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest
import structlog.testing
from aiohttp import web
from aiohttp.test_utils import TestClient

from mlgate.config import Settings
from mlgate.service.ingest.batch import ValidatedBatch
from mlgate.service.routes.ingest import STREAM_CHUNK_RECORDS
from mlgate.service.state import DRAINING, INGEST_PIPELINE, RECORD_SINK, RECORD_VALIDATOR
from mlgate.workers.errors import MailboxFull, SinkFailed
from mlgate.workers.sinks import local_log_writer
from mlgate.workers.sinks.local_log_writer import LocalLogWriter
from mlgate.workers.sinks.records import OutboundRecord
from tests.conftest import AppClientFactory
from tests.support import ManagedProcess, hang_appends, until

Client = TestClient[web.Request, web.Application]
OPEN: dict[str, Any] = {"auth_disabled": True, "rate_limits_enabled": False}
NDJSON = {"Content-Type": "application/x-ndjson"}


@pytest.fixture
async def client(app_client: AppClientFactory, make_settings: Callable[..., Settings]) -> Client:
    # A short wait for ids another request holds: a leaked claim answers 409 quickly.
    return await app_client(make_settings(feature_dims=(4,), dedup_in_flight_wait_s=0.2, **OPEN))


def _failing_outbound(client: Client, monkeypatch: pytest.MonkeyPatch, calls_before: int) -> list[int]:
    """The validator's ``outbound`` fails once, after ``calls_before`` calls."""
    validator = client.app[RECORD_VALIDATOR]
    outbound = validator.outbound
    calls: list[int] = []

    def failing(batch: ValidatedBatch, tracking_id: str) -> list[OutboundRecord]:
        calls.append(len(batch.accepted))
        if len(calls) == calls_before + 1:
            raise OverflowError("int too big to convert")
        return outbound(batch, tracking_id)

    monkeypatch.setattr(validator, "outbound", failing)
    return calls


def _records(first: int, count: int) -> list[dict[str, Any]]:
    return [{"record_id": f"r-{first + i}", "features": [1.0, 2.0, 3.0, 4.0]} for i in range(count)]


async def test_a_batch_failing_before_its_write_releases_its_claims(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_outbound(client, monkeypatch, calls_before=0)
    batch = {"source": "s", "records": _records(0, 3)}
    failed = await client.post("/api/v2/ingest", json=batch)
    assert failed.status == 500
    resent = await client.post("/api/v2/ingest", json=batch)
    assert resent.status == 202, await resent.text()
    answer = await resent.json()
    assert (answer["records_accepted"], answer["records_duplicate"]) == (3, 0)


async def test_a_stream_failing_after_written_chunks_is_500_saying_how_many_were_written(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_outbound(client, monkeypatch, calls_before=1)
    records = _records(0, STREAM_CHUNK_RECORDS + 5)
    body = b"".join(msgspec.json.encode(r) + b"\n" for r in records)
    with structlog.testing.capture_logs() as logs:
        response = await client.post("/api/v2/ingest/stream?source=s", data=body, headers=NDJSON)
    assert response.status == 500
    problem = await response.json(content_type=None)
    assert f"The first {STREAM_CHUNK_RECORDS} records accepted" in problem["detail"]
    assert f"no record from index {STREAM_CHUNK_RECORDS} on was written" in problem["detail"]
    assert "tracking_id" in problem["detail"]
    assert any(entry["event"] == "unhandled_error" for entry in logs)  # logged as a fault
    # The failed chunk's ids were let go: resent from there, they are written.
    rest = b"".join(msgspec.json.encode(r) + b"\n" for r in records[STREAM_CHUNK_RECORDS:])
    resent = await client.post("/api/v2/ingest/stream?source=s", data=rest, headers=NDJSON)
    assert resent.status == 202, await resent.text()
    assert (await resent.json())["records_accepted"] == 5


def _failing_write(client: Client, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """The pipeline's second write fails with ``error``, after the sink had the records."""
    pipeline = client.app[INGEST_PIPELINE]
    write = pipeline.write
    calls: list[int] = []

    async def failing(tenant: str, batch: ValidatedBatch, tracking_id: str) -> Any:
        calls.append(len(batch.accepted))
        if len(calls) == 2:
            raise error
        return await write(tenant, batch, tracking_id)

    monkeypatch.setattr(pipeline, "write", failing)


async def _stream_of_two_chunks(client: Client) -> str:
    records = _records(0, STREAM_CHUNK_RECORDS + 5)
    body = b"".join(msgspec.json.encode(r) + b"\n" for r in records)
    response = await client.post("/api/v2/ingest/stream?source=s", data=body, headers=NDJSON)
    assert response.status == 503
    return str((await response.json(content_type=None))["detail"])


async def test_a_stream_whose_write_failed_with_an_unknown_outcome_says_those_may_have_landed(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: after a write that may be partial (a Kafka timeout, say), the detail
    said nothing from that chunk on was written, and advised a resend that is 409
    while the chunk's ids stay claimed."""
    _failing_write(client, monkeypatch, SinkFailed("Kafka did not answer"))
    detail = await _stream_of_two_chunks(client)
    last = STREAM_CHUNK_RECORDS + 4
    assert f"records {STREAM_CHUNK_RECORDS} to {last} were being written" in detail
    assert "some may have landed" in detail and "409" in detail
    assert "a resend writes them again, and Kafka then holds twice any that had landed" in detail
    assert f"No record from index {last + 1} on was written" in detail


def _sink_failing_once(client: Client, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    sink = client.app[RECORD_SINK]
    write = sink.write
    calls: list[int] = []

    async def failing(records: list[OutboundRecord], **kwargs: Any) -> None:
        calls.append(len(records))
        if len(calls) == 1:
            raise error
        await write(records, **kwargs)

    monkeypatch.setattr(sink, "write", failing)


async def _batch_failed_once_then_resent(
    client: Client, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> tuple[str, int]:
    """The 503's detail of a batch whose write fails with ``error``, and the status of
    its resend at once."""
    _sink_failing_once(client, monkeypatch, error)
    batch = {"source": "s", "records": _records(0, 3)}
    failed = await client.post("/api/v2/ingest", json=batch)
    assert failed.status == 503
    detail = str((await failed.json(content_type=None))["detail"])
    return detail, (await client.post("/api/v2/ingest", json=batch)).status


async def test_a_batch_whose_write_may_have_landed_says_so_and_holds_its_ids(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: the 503 read as if nothing happened ("spill is full"), and the
    client's resend wrote the records twice."""
    error = SinkFailed("Kafka did not answer")
    detail, resent = await _batch_failed_once_then_resent(client, monkeypatch, error)
    assert "Kafka did not answer. Records of this batch may have been written" in detail
    assert "a resend of them is 409 until then" in detail
    assert resent == 409


async def test_a_batch_the_sink_refused_says_nothing_of_landing(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    detail, resent = await _batch_failed_once_then_resent(client, monkeypatch, MailboxFull("full"))
    assert "may have been written" not in detail
    assert resent == 202


async def test_a_stream_whose_write_was_refused_says_nothing_from_that_chunk_was_written(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_write(client, monkeypatch, MailboxFull("full"))
    detail = await _stream_of_two_chunks(client)
    assert f"no record from index {STREAM_CHUNK_RECORDS} on was written" in detail
    assert "may have landed" not in detail


def _failing_append(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local log's next append fails as a full disk does, cut back to where it was."""
    from mlgate.service.state import RECORD_SINK

    log = client.app[RECORD_SINK]._log  # the embedded local log's files
    append = log.append
    calls: list[int] = []

    def failing(frames: list[bytes]) -> int:
        calls.append(len(frames))
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return append(frames)

    monkeypatch.setattr(log, "append", failing)


async def test_a_local_log_append_cut_back_releases_its_claims(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: a failed append is cut back, so none of its records can land, yet
    their ids stayed claimed: a resend was 409 for the claims' lapse."""
    _failing_append(client, monkeypatch)
    batch = {"source": "s", "records": _records(0, 3)}
    failed = await client.post("/api/v2/ingest", json=batch)
    assert failed.status == 503
    resent = await client.post("/api/v2/ingest", json=batch)
    assert resent.status == 202, await resent.text()
    assert (await resent.json())["records_accepted"] == 3


async def test_a_streams_failure_counts_only_the_rejections_before_its_chunk(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: the detail counted the failing chunk's rejections among records 0 to
    999 (15 rejected of a 1,000 that held 5)."""
    _failing_write(client, monkeypatch, MailboxFull("full"))
    records: list[dict[str, Any]] = _records(0, STREAM_CHUNK_RECORDS + 20)
    for bad in (3, 7, STREAM_CHUNK_RECORDS + 1, STREAM_CHUNK_RECORDS + 2):
        records[bad] = {"record_id": f"bad-{bad}", "features": [1.0]}
    body = b"".join(msgspec.json.encode(r) + b"\n" for r in records)
    response = await client.post("/api/v2/ingest/stream?source=s", data=body, headers=NDJSON)
    assert response.status == 503
    detail = (await response.json(content_type=None))["detail"]
    assert f"of its records 0 to {STREAM_CHUNK_RECORDS - 1}, 998 were written" in detail
    assert "2 were rejected" in detail



async def test_a_write_that_stalls_is_answered_503_and_its_records_land_once(
    app_client: AppClientFactory, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hung disk: the caller is answered at the sink's bound, not held as long as the
    disk hangs; the write goes on and its outcome settles the ids, so a resend once it
    landed is a duplicate (a review: the ids were left to lapse, and a resend after
    that wrote the records twice)."""
    monkeypatch.setattr(local_log_writer, "STALL_S", 0.2)
    client = await app_client(make_settings(feature_dims=(4,), dedup_in_flight_wait_s=0.05, **OPEN))
    sink = client.app[RECORD_SINK]
    assert isinstance(sink, LocalLogWriter) and sink._log is not None
    release = hang_appends(sink)
    batch = {"source": "s", "records": _records(0, 3)}
    try:
        stalled = await client.post("/api/v2/ingest", json=batch)
        assert stalled.status == 503
        assert "may still land" in (await stalled.json())["detail"]
        assert (await client.post("/api/v2/ingest", json=batch)).status == 409  # still writing
    finally:
        release.set()
    await until(lambda: sink.durable_offset == 3)
    again = await client.post("/api/v2/ingest", json=batch)
    assert again.status == 202, await again.text()
    assert (await again.json())["records_duplicate"] == 3
    assert sink.durable_offset == 3  # each record once


async def test_a_stream_cut_short_without_redis_says_its_resend_is_caught_by_this_process_only(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_write(client, monkeypatch, MailboxFull("full"))
    detail = await _stream_of_two_chunks(client)
    assert "to this process within the dedup window counts them as duplicates" in detail
    assert "without REDIS_URL another process, or this one restarted, writes them again" in detail


async def test_a_stream_cut_short_while_stopping_without_redis_promises_no_dedup(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: after SIGTERM the answer said a resend counted as duplicates; without
    Redis the dedup window went with the process, and the next one wrote them again."""
    _failing_write(client, monkeypatch, MailboxFull("full"))
    pipeline = client.app[INGEST_PIPELINE]
    write = pipeline.write

    async def stopping(tenant: str, batch: ValidatedBatch, tracking_id: str) -> Any:
        client.app[DRAINING].set()  # SIGTERM came while the stream was written
        return await write(tenant, batch, tracking_id)

    monkeypatch.setattr(pipeline, "write", stopping)
    detail = await _stream_of_two_chunks(client)
    client.app[DRAINING].clear()
    assert "counts them as duplicates" not in detail
    assert "records resent that were written are written again" in detail


async def test_a_stream_cut_short_on_redis_says_which_ids_another_process_would_not_catch(
    app_client: AppClientFactory, make_settings: Callable[..., Settings], redis_server: ManagedProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A review: it said any resend counted as duplicates; the ids a tenant past its
    Redis budget keeps in process were written again by another process."""
    settings = make_settings(feature_dims=(4,), redis_url=f"redis://127.0.0.1:{redis_server.port}", **OPEN)
    client = await app_client(settings)
    _failing_write(client, monkeypatch, MailboxFull("full"))
    detail = await _stream_of_two_chunks(client)
    assert "in any process on the same Redis" in detail
    assert "MLGATE_DEDUP_REDIS_TENANT_MAX_IDS" in detail
