"""``POST /api/v2/ingest/stream``: NDJSON or concatenated msgpack, partial success with
indexes counted over the whole stream, per-record size limit, bounded memory."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
import resource
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from mlgate.config import Settings, worker_data_dir
from mlgate.service.routes.ingest import MAX_REPORTED_ERRORS, STREAM_CHUNK_RECORDS
from mlgate.service.state import RECORD_SINK
from mlgate.workers.errors import MailboxFull
from mlgate.workers.sinks.local_log import read_log
from mlgate.workers.sinks.records import OutboundRecord
from tests.conftest import AppClientFactory

Client = TestClient[web.Request, web.Application]
# Auth and rate limits have tests of their own; here they would only get in the way.
OPEN: dict[str, Any] = {"auth_disabled": True, "rate_limits_enabled": False}
STREAM = "/api/v2/ingest/stream?source=sensors"
NDJSON = {"Content-Type": "application/x-ndjson"}
MSGPACK = {"Content-Type": "application/msgpack"}
MAX_RECORD = 4096


def _record(i: int, **fields: Any) -> dict[str, Any]:
    return {"record_id": f"r-{i}", "features": [float(i), 0.0, 1.0, 2.0], **fields}


def _ndjson(records: Iterable[object]) -> bytes:
    return b"".join(msgspec.json.encode(r) + b"\n" for r in records)


def _msgpack(records: Iterable[object]) -> bytes:
    return b"".join(msgspec.msgpack.encode(r) for r in records)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        feature_dims=(4,),
        max_stream_record_bytes=MAX_RECORD,
        **OPEN,
    )


@pytest.fixture
async def client(app_client: AppClientFactory, settings: Settings) -> Client:
    return await app_client(settings)


def _stored_keys(settings: Settings) -> list[str]:
    log = Path(worker_data_dir(settings)) / "log"
    return [entry.record.key.decode() for entry in read_log(log)]


async def _problem(response: ClientResponse, status: int) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/problem+json"
    body: dict[str, Any] = await response.json(content_type=None)
    assert body["status"] == status and body["type"].startswith("/problems/") and body["title"]
    return body


async def _assert_still_serving(client: Client) -> None:
    record = _record(0, record_id=f"after-{uuid.uuid4().hex}")
    response = await client.post(STREAM, data=_ndjson([record]), headers=NDJSON)
    assert response.status == 202


# -- accepted streams -----------------------------------------------------------------


async def test_ndjson_stream_is_stored_in_order(client: Client, settings: Settings) -> None:
    response = await client.post(STREAM, data=_ndjson(_record(i) for i in range(10)), headers=NDJSON)
    assert response.status == 202
    body = await response.json()
    assert (body["records_accepted"], body["records_rejected"], body["errors"]) == (10, 0, [])
    assert _stored_keys(settings) == [f"r-{i}" for i in range(10)]


async def test_ndjson_stream_skips_blank_lines_and_takes_a_last_line_without_newline(
    client: Client, settings: Settings
) -> None:
    body = b"\n" + _ndjson([_record(0)]) + b"\r\n\n" + msgspec.json.encode(_record(1))
    response = await client.post(STREAM, data=body, headers=NDJSON)
    assert response.status == 202
    assert _stored_keys(settings) == ["r-0", "r-1"]


async def test_concatenated_msgpack_stream_is_stored_in_order(
    client: Client, settings: Settings
) -> None:
    response = await client.post(STREAM, data=_msgpack(_record(i) for i in range(10)), headers=MSGPACK)
    assert response.status == 202
    assert (await response.json())["records_accepted"] == 10
    assert _stored_keys(settings) == [f"r-{i}" for i in range(10)]


async def test_msgpack_stream_of_many_small_records_fits_a_small_record_limit(
    app_client: AppClientFactory, make_settings: Callable[..., Settings]
) -> None:
    """The limit is per record: a chunk holding many small records is fine."""
    client = await app_client(make_settings(feature_dims=(4,), max_stream_record_bytes=100, **OPEN))
    response = await client.post(STREAM, data=_msgpack(_record(i) for i in range(5000)), headers=MSGPACK)
    assert response.status == 202
    assert (await response.json())["records_accepted"] == 5000


async def test_gzip_ndjson_stream_is_accepted(client: Client) -> None:
    body = gzip.compress(_ndjson(_record(i) for i in range(100)))
    response = await client.post(STREAM, data=body, headers={**NDJSON, "Content-Encoding": "gzip"})
    assert response.status == 202
    assert (await response.json())["records_accepted"] == 100


async def test_stream_records_carry_the_source_and_one_tracking_id(
    client: Client, settings: Settings
) -> None:
    count = STREAM_CHUNK_RECORDS * 2 + 5
    response = await client.post(STREAM, data=_ndjson(_record(i) for i in range(count)), headers=NDJSON)
    tracking_id = (await response.json())["tracking_id"]
    entries = list(read_log(Path(worker_data_dir(settings)) / "log"))
    assert len(entries) == count
    assert {dict(e.record.headers)["tracking_id"] for e in entries} == {tracking_id.encode()}
    assert {dict(e.record.headers)["source"] for e in entries} == {b"sensors"}


# -- partial success ------------------------------------------------------------------


def _stream_with_bad_records(total: int, bad: Mapping[int, object]) -> list[object]:
    return [bad.get(i, _record(i)) for i in range(total)]


BAD = {
    3: "not a record",  # decoded, wrong type
    STREAM_CHUNK_RECORDS + 500: _record(1500, features="1,2,3,4"),  # wrong field type
    2 * STREAM_CHUNK_RECORDS + 100: _record(2100, features=[1.0, 2.0]),  # wrong dimension
    2 * STREAM_CHUNK_RECORDS + 101: _record(2101, features=[1.0, 2.0, 3.0, float("inf")]),
}


async def test_ndjson_partial_success_reports_indexes_over_the_whole_stream(
    client: Client, settings: Settings
) -> None:
    records = _stream_with_bad_records(2500, {**BAD, 2 * STREAM_CHUNK_RECORDS + 101: {}})
    body = _ndjson(records).replace(b'"not a record"', b"{not json")
    response = await client.post(STREAM, data=body, headers=NDJSON)
    assert response.status == 202
    answer = await response.json()
    assert (answer["records_accepted"], answer["records_rejected"]) == (2496, 4)
    assert [e["index"] for e in answer["errors"]] == sorted(BAD)
    assert answer["errors"][1]["error"].endswith("at features")
    # A record the schema rejects is named by its id; one that is not JSON cannot be.
    assert [e["record_id"] for e in answer["errors"][:2]] == [None, "r-1500"]
    assert "allowed dimensions" in answer["errors"][2]["error"]
    assert len(_stored_keys(settings)) == 2496


async def test_msgpack_partial_success_reports_indexes_over_the_whole_stream(
    client: Client,
) -> None:
    records = _stream_with_bad_records(2500, BAD)
    response = await client.post(STREAM, data=_msgpack(records), headers=MSGPACK)
    assert response.status == 202
    answer = await response.json()
    assert answer["records_rejected"] == 4
    assert [e["index"] for e in answer["errors"]] == sorted(BAD)
    assert "finite" in answer["errors"][3]["error"]
    assert [e["record_id"] for e in answer["errors"]] == [None, "r-1500", "r-2100", "r-2101"]


@pytest.mark.parametrize(("encode", "headers"), [(_ndjson, NDJSON), (_msgpack, MSGPACK)], ids=["ndjson", "msgpack"])
async def test_a_stream_records_refused_metadata_value_is_named_by_its_key(
    client: Client, encode: Callable[[Iterable[object]], bytes], headers: Mapping[str, str]
) -> None:
    records = [_record(0), _record(1, metadata={"site": "a", "gain": [1]})]
    response = await client.post(STREAM, data=encode(records), headers=headers)
    assert response.status == 202
    [error] = (await response.json())["errors"]
    assert error["index"] == 1
    assert error["error"].endswith(" at metadata['gain']"), error


async def test_stream_lists_at_most_the_first_errors_but_counts_them_all(client: Client) -> None:
    count = MAX_REPORTED_ERRORS + 500
    records = [_record(i, features=[1.0]) for i in range(count)] + [_record(count)]
    response = await client.post(STREAM, data=_ndjson(records), headers=NDJSON)
    assert response.status == 202
    answer = await response.json()
    assert answer["records_rejected"] == count and answer["records_accepted"] == 1
    assert len(answer["errors"]) == MAX_REPORTED_ERRORS
    assert [e["index"] for e in answer["errors"]] == list(range(MAX_REPORTED_ERRORS))


async def test_stream_with_every_record_rejected_is_422_and_writes_nothing(
    client: Client, settings: Settings
) -> None:
    records = [_record(i, features=[1.0]) for i in range(3)]
    response = await client.post(STREAM, data=_ndjson(records), headers=NDJSON)
    problem = await _problem(response, 422)
    assert [e["index"] for e in problem["errors"]] == [0, 1, 2]
    assert problem["detail"] == "Every record of the stream was rejected; nothing was written"
    assert _stored_keys(settings) == []


# -- refused streams ------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    ["", "?source=", "?source=bad%20name", "?source=s%0A", "?source=" + "s" * 129, "?source=a&source=b"],
)
async def test_stream_without_a_valid_source_is_422(client: Client, query: str) -> None:
    response = await client.post(
        "/api/v2/ingest/stream" + query, data=_ndjson([_record(0)]), headers=NDJSON
    )
    problem = await _problem(response, 422)
    assert problem["errors"][0]["loc"] == "query.source"
    await _assert_still_serving(client)


@pytest.mark.parametrize(
    "first",
    [b'{"features": [1, 2, 3\n', b'{"features": [1, 2, 3, NaN]}\n', b'{"features": [1, 2, 3, 4]} x\n'],
    ids=["truncated", "nan", "trailing-junk"],
)
async def test_a_json_stream_whose_first_record_is_malformed_rejects_that_record_alone(
    client: Client, first: bytes
) -> None:
    """A review of the refusal of documents over lines: a stream whose first record
    was merely malformed was refused whole, where NDJSON rejects that record alone."""
    body = first + _ndjson(_record(i) for i in range(2))
    response = await client.post(STREAM, data=body, headers={"Content-Type": "application/json"})
    assert response.status == 202
    answer = await response.json()
    assert (answer["records_accepted"], answer["records_rejected"]) == (2, 1)


@pytest.mark.parametrize("mark", [b"", b"\xef\xbb\xbf"], ids=["plain", "byte-order-mark"])
async def test_a_stream_sent_as_application_json_is_read_as_ndjson(
    client: Client, settings: Settings, mark: bytes
) -> None:
    """A review: 415, where every body-carrying endpoint takes JSON."""
    response = await client.post(
        STREAM, data=mark + _ndjson(_record(i) for i in range(3)), headers={"Content-Type": "application/json"}
    )
    assert response.status == 202
    assert (await response.json())["records_accepted"] == 3
    assert _stored_keys(settings) == ["r-0", "r-1", "r-2"]


@pytest.mark.parametrize(
    "body",
    [
        b'[\n{"features": [1, 2, 3, 4]},\n{"features": [5, 6, 7, 8]}\n]\n',
        b'[{"features": [1, 2, 3, 4]}\n,{"features": [5, 6, 7, 8]}]',
        b'  [{"features": [1, 2, 3, 4]}]',
        b'\xef\xbb\xbf[\n{"features": [1, 2, 3, 4]}\n,\n{"features": [5, 6, 7, 8]}\n]\n',
        b'{\n  "source": "s",\n  "records": [\n    {"features": [1, 2, 3, 4]},\n    {"features": [5, 6, 7, 8]}\n  ]\n}\n',
    ],
    ids=["pretty", "leading-commas", "one-line", "byte-order-mark", "pretty-batch"],
)
async def test_a_json_document_over_lines_sent_to_the_stream_is_refused_whole(
    client: Client, settings: Settings, body: bytes
) -> None:
    """A review: read as NDJSON, an array's lines that were records were written, a
    202 for part of a document its client would resend whole."""
    response = await client.post(STREAM, data=body, headers={"Content-Type": "application/json"})
    problem = await _problem(response, 422)
    assert "JSON document" in problem["detail"]
    assert _stored_keys(settings) == []


@pytest.mark.parametrize("content_type", ["text/plain", None])
async def test_stream_of_another_content_type_is_415_naming_the_stream_formats(
    client: Client, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = await client.post(STREAM, data=_ndjson([_record(0)]), headers=headers)
    problem = await _problem(response, 415)
    assert "application/x-ndjson" in problem["detail"] and "application/msgpack" in problem["detail"]


async def test_empty_stream_is_422(client: Client) -> None:
    response = await client.post(STREAM, data=b"\n\n", headers=NDJSON)
    await _problem(response, 422)


async def test_ndjson_line_over_max_stream_record_bytes_is_413(client: Client) -> None:
    long_line = _record(1, metadata={"note": "x" * MAX_RECORD})
    body = _ndjson([_record(0), long_line, _record(2)])
    assert len(body) < 64 * 1024  # arrives in one chunk, whole lines only
    response = await client.post(STREAM, data=body, headers=NDJSON)
    problem = await _problem(response, 413)
    assert str(MAX_RECORD) in problem["detail"]
    await _assert_still_serving(client)


async def test_stream_failing_after_written_chunks_says_how_many_were_written(
    client: Client,
) -> None:
    good = [_record(i) for i in range(3 * STREAM_CHUNK_RECORDS)]
    long_line = _record(-1, metadata={"note": "x" * MAX_RECORD})

    async def body() -> AsyncIterator[bytes]:
        yield _ndjson(good)
        yield _ndjson([long_line])

    response = await client.post(STREAM, data=body(), headers=NDJSON)
    problem = await _problem(response, 413)
    written = re.search(r"The first (\d+) records accepted", problem["detail"])
    assert written is not None and int(written.group(1)) >= STREAM_CHUNK_RECORDS
    assert "tracking_id" in problem["detail"]


async def test_endless_ndjson_line_is_413_without_waiting_for_its_end(client: Client) -> None:
    async def endless_line() -> AsyncIterator[bytes]:
        yield b'{"features": [1.0, 2.0, 3.0, 4.0], "metadata": {"note": "'
        for _ in range(8):
            yield b"x" * (16 * 1024)
        await asyncio.Event().wait()  # the line, and the stream, never end

    response = await client.post(STREAM, data=endless_line(), headers=NDJSON)
    await _problem(response, 413)
    await _assert_still_serving(client)


async def test_msgpack_record_over_max_stream_record_bytes_is_413(client: Client) -> None:
    body = _msgpack([_record(0), _record(1, metadata={"note": "x" * MAX_RECORD}), _record(2)])
    response = await client.post(STREAM, data=body, headers=MSGPACK)
    await _problem(response, 413)
    await _assert_still_serving(client)


async def test_truncated_msgpack_stream_is_400(client: Client) -> None:
    body = _msgpack(_record(i) for i in range(3))[:-5]
    response = await client.post(STREAM, data=body, headers=MSGPACK)
    problem = await _problem(response, 400)
    assert "inside msgpack record 2" in problem["detail"]
    await _assert_still_serving(client)


async def test_invalid_msgpack_stream_is_400(client: Client) -> None:
    body = _msgpack([_record(0)]) + b"\xc1" + _msgpack([_record(1)])
    response = await client.post(STREAM, data=body, headers=MSGPACK)
    await _problem(response, 400)
    await _assert_still_serving(client)


# -- bounded memory -------------------------------------------------------------------


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


async def test_long_stream_is_counted_in_full_in_bounded_memory(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200k records generated lazily: the server writes chunk after chunk while the
    stream still arrives, and the process grows by a small fraction of the stream."""
    total, per_chunk = 200_000, 2000
    line = msgspec.json.encode({"features": [0.5, 1.5, 2.5, 3.5], "label": 1.0}) + b"\n"
    sink = client.app[RECORD_SINK]
    write = sink.write
    writes: list[int] = []
    first_write = asyncio.Event()

    async def observed_write(records: list[OutboundRecord], lane: str = "", tenants=()) -> None:
        await write(records, lane, tenants)
        writes.append(len(records))
        first_write.set()

    monkeypatch.setattr(sink, "write", observed_write)
    sent = 0
    baseline = peak = _resident_bytes()
    wrote_before_the_end = False

    async def lazy_stream() -> AsyncIterator[bytes]:
        nonlocal sent, peak, baseline, wrote_before_the_end
        for n in range(total // per_chunk):
            if n == total // per_chunk // 2:
                # Half sent: a server that buffered the stream would not have written yet.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(first_write.wait(), 5)
                    wrote_before_the_end = True
                # Growth counts from here: warm-up allocations (first writes, code run
                # once) are not the stream being held.
                baseline = peak = _resident_bytes()
            peak = max(peak, _resident_bytes())
            chunk = line * per_chunk
            sent += len(chunk)
            yield chunk

    response = await client.post(STREAM, data=lazy_stream(), headers=NDJSON)
    assert response.status == 202
    answer = await response.json()
    assert (answer["records_accepted"], answer["records_rejected"]) == (total, 0)
    assert wrote_before_the_end
    assert sum(writes) == total and max(writes) <= STREAM_CHUNK_RECORDS
    assert sent > 8 * 1024 * 1024
    assert peak - baseline < sent / 4, f"grew {peak - baseline} bytes for a {sent}-byte stream"


async def test_a_timestamp_with_no_utc_time_rejects_its_record_and_the_stream_goes_on(
    client: Client, settings: Settings
) -> None:
    records = [_record(i) for i in range(3)]
    records[1]["timestamp"] = "9999-12-31T23:59:59-01:00"
    response = await client.post(STREAM, data=_ndjson(records), headers=NDJSON)
    assert response.status == 202, await response.text()
    answer = await response.json()
    assert answer["records_accepted"] == 2 and answer["errors"][0]["index"] == 1
    assert "timestamp" in answer["errors"][0]["error"]
    assert len(_stored_keys(settings)) == 2


async def test_stream_refused_by_the_sink_after_written_chunks_says_how_many_were_written(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal of the sink (here its mailbox full; in an outage the spill's share) is
    a 503 that still tells the client which part of its stream is durable."""
    sink = client.app[RECORD_SINK]
    write = sink.write
    writes: list[int] = []

    async def full_after_the_first(records: list[OutboundRecord], lane: str = "", tenants=()) -> None:
        writes.append(len(records))
        if len(writes) > 1:
            raise MailboxFull("local_log mailbox is full")
        await write(records, lane, tenants)

    monkeypatch.setattr(sink, "write", full_after_the_first)
    body = _ndjson(_record(i) for i in range(2 * STREAM_CHUNK_RECORDS))
    response = await client.post(STREAM, data=body, headers=NDJSON)
    problem = await _problem(response, 503)
    assert response.headers["Retry-After"].isdigit()
    assert f"The first {STREAM_CHUNK_RECORDS} records accepted" in problem["detail"]
    assert "tracking_id" in problem["detail"]


async def test_a_stream_failing_part_way_lists_the_records_it_rejected_before(
    client: Client,
) -> None:
    """A review: the detail said "1 were rejected" and the client could not tell which."""
    bad = {"record_id": "bad", "features": [1.0]}
    good = [_record(i) for i in range(STREAM_CHUNK_RECORDS)]
    long_line = _record(-1, metadata={"note": "x" * MAX_RECORD})

    async def body() -> AsyncIterator[bytes]:
        yield _ndjson([*good[:5], bad, *good[5:]])
        yield _ndjson([long_line])

    response = await client.post(STREAM, data=body(), headers=NDJSON)
    problem = await _problem(response, 413)
    assert "1 were rejected" in problem["detail"]
    [error] = problem["errors"]
    assert (error["index"], error["record_id"], error["loc"]) == (5, "bad", "records[5].features")


async def test_a_stream_with_an_idempotency_key_is_held_to_the_body_limit(
    app_client: AppClientFactory, make_settings: Callable[..., Settings]
) -> None:
    """Its body is read whole to fingerprint it (README: Idempotency); without a key the
    same stream is taken whatever its length."""
    client = await app_client(
        make_settings(feature_dims=(4,), max_stream_record_bytes=MAX_RECORD, max_body_bytes=4096, **OPEN)
    )
    body = _ndjson({"record_id": f"k-{i}", "features": [1.0, 2.0, 3.0, 4.0]} for i in range(200))
    assert len(body) > 4096
    keyed = await client.post(STREAM, data=body, headers={**NDJSON, "Idempotency-Key": "big-1"})
    assert keyed.status == 413, await keyed.text()
    plain = await client.post(STREAM, data=body, headers=NDJSON)
    assert plain.status == 202, await plain.text()
    assert (await plain.json())["records_accepted"] == 200
