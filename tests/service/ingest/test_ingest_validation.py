"""``POST /api/v2/ingest`` failure paths: each bad input a clear 4xx problem document,
one bad record costing only itself, and the server serving on afterwards."""

from __future__ import annotations

import asyncio
import gzip
import io
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import ClientResponse, web
from aiohttp.helpers import HeadersMixin
from aiohttp.test_utils import TestClient

from mlgate.config import Settings, worker_data_dir
from mlgate.service.http.codec import MAX_MESSAGE_CHARS, Format
from mlgate.service.ingest import validation
from mlgate.workers.sinks.local_log import read_log
from tests.conftest import AppClientFactory

Client = TestClient[web.Request, web.Application]
# Auth and rate limits have tests of their own; here they would only get in the way.
OPEN: dict[str, Any] = {"auth_disabled": True, "rate_limits_enabled": False}
INGEST = "/api/v2/ingest"
MAX_BODY = 1024 * 1024
MSGPACK = {"Content-Type": "application/msgpack"}


def _record(i: int = 0, **fields: Any) -> dict[str, Any]:
    return {"record_id": f"r-{i}", "features": [float(i), 1.0, 2.0, 3.0], **fields}


def _batch(*records: object, source: str = "sensors") -> dict[str, Any]:
    return {"source": source, "records": list(records) or [_record()]}


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        feature_dims=(4,),
        max_body_bytes=MAX_BODY,
        max_batch_records=100,
        **OPEN,
    )


@pytest.fixture
async def client(app_client: AppClientFactory, settings: Settings) -> Client:
    return await app_client(settings)


def _stored(settings: Settings) -> list[dict[str, Any]]:
    log = Path(worker_data_dir(settings)) / "log"
    return [msgspec.json.decode(entry.record.value) for entry in read_log(log)]


async def _problem(response: ClientResponse, status: int) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/problem+json"
    body: dict[str, Any] = await response.json(content_type=None)
    assert body["status"] == status
    assert body["type"].startswith("/problems/")
    assert body["title"]
    assert body["instance"] == INGEST
    return body


async def _assert_still_serving(client: Client) -> None:
    response = await client.post(INGEST, json=_batch(_record(99, record_id="after")))
    assert response.status == 202
    assert (await response.json())["records_accepted"] == 1


# -- the body as a whole --------------------------------------------------------------


async def test_non_json_body_is_400(client: Client) -> None:
    response = await client.post(
        INGEST, data=b'{"source": "s", "records": [', headers={"Content-Type": "application/json"}
    )
    body = await _problem(response, 400)
    assert "json" in body["detail"]
    await _assert_still_serving(client)


async def test_undecodable_msgpack_body_is_400(client: Client) -> None:
    response = await client.post(INGEST, data=b"\xc1\xc1\xc1", headers=MSGPACK)
    await _problem(response, 400)
    await _assert_still_serving(client)


async def test_wrong_content_type_is_415(client: Client) -> None:
    response = await client.post(
        INGEST, data=b"source=s", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    body = await _problem(response, 415)
    assert "application/msgpack" in body["detail"]
    await _assert_still_serving(client)


async def test_empty_batch_is_422_located_at_records(client: Client) -> None:
    response = await client.post(INGEST, json={"source": "s", "records": []})
    body = await _problem(response, 422)
    assert [e["loc"] for e in body["errors"]] == ["records"]
    await _assert_still_serving(client)


async def test_missing_source_is_422_located_at_source(client: Client) -> None:
    response = await client.post(INGEST, json={"records": [_record()]})
    body = await _problem(response, 422)
    [error] = body["errors"]
    assert error["loc"] == "source"
    assert "source" in error["msg"]
    await _assert_still_serving(client)


@pytest.mark.parametrize("source", ["no spaces", "slash/ed", "", "s" * 129, "trailing-newline\n"])
async def test_invalid_source_is_422_located_at_source(client: Client, source: str) -> None:
    response = await client.post(INGEST, json=_batch(source=source))
    body = await _problem(response, 422)
    assert [e["loc"] for e in body["errors"]] == ["source"]


async def test_body_that_is_not_a_batch_is_422(client: Client) -> None:
    response = await client.post(INGEST, json=[_record()])
    body = await _problem(response, 422)
    assert body["errors"][0]["loc"] == "body"
    await _assert_still_serving(client)


async def test_unknown_batch_field_is_422(client: Client) -> None:
    response = await client.post(INGEST, json={**_batch(), "extra": 1})
    body = await _problem(response, 422)
    assert "extra" in body["errors"][0]["msg"]


async def test_a_long_unknown_batch_field_is_named_in_part(client: Client) -> None:
    """A review: msgspec's message quotes the field's whole name, and answers repeated
    it (detail and msg) whatever its length."""
    response = await client.post(INGEST, json={**_batch(), "z" * 100_000: 1})
    body = await _problem(response, 422)
    assert len(body["detail"]) <= MAX_MESSAGE_CHARS
    assert len(body["errors"][0]["msg"]) <= MAX_MESSAGE_CHARS
    assert body["errors"][0]["msg"].startswith("Object contains unknown field `zzz")


async def test_a_record_with_a_long_unknown_field_is_rejected_with_its_name_in_part(
    client: Client,
) -> None:
    response = await client.post(INGEST, json=_batch(_record(0, **{"z" * 100_000: 1}), _record(1)))
    assert response.status == 202
    body = await response.json()
    assert body["records_accepted"] == 1
    [error] = body["errors"]
    assert error["index"] == 0
    assert len(error["error"]) <= MAX_MESSAGE_CHARS
    assert "unknown field" in error["error"] and "characters left out" in error["error"]


async def test_batch_over_max_batch_records_is_422(client: Client, settings: Settings) -> None:
    records = [_record(i) for i in range(settings.max_batch_records + 1)]
    response = await client.post(INGEST, json=_batch(*records))
    body = await _problem(response, 422)
    assert [e["loc"] for e in body["errors"]] == ["records"]
    assert _stored(settings) == []
    await _assert_still_serving(client)


def _empty_records(count: int, last: bytes = b"{}", head: bytes = b"") -> bytes:
    """A JSON batch of ``count`` empty records then ``last``: over 1 MiB from 350k."""
    return head + b'{"source":"s","records":[' + b"{}," * count + last + b"]}"


@pytest.fixture
async def roomy(app_client: AppClientFactory, settings: Settings) -> Client:
    """``client`` with room for bodies of a few MB."""
    return await app_client(msgspec.structs.replace(settings, max_body_bytes=4 * MAX_BODY))


async def test_a_huge_json_batch_holding_a_number_simdjson_refuses_is_still_counted_first(
    roomy: Client, settings: Settings
) -> None:
    """A review: one integer past 64 bits made the count give way, and 5M records
    were built (0.6 s, +290 MB) before msgspec's own 422."""
    # And a string escape that reads as a number (a review of the first fix: its
    # numbers rewritten inside strings broke the escape, and the count gave way).
    last = b'{"metadata":{"z":"caf\\u00e9123","a":123456789012345678901234567890}}'
    body = _empty_records(400_000, last=last)
    response = await roomy.post(INGEST, data=io.BytesIO(body), headers={"Content-Type": "application/json"})
    problem = await _problem(response, 422)
    assert f"at most {settings.max_batch_records} records, got 400001" in problem["detail"]


async def test_a_huge_json_batch_giving_records_twice_is_422_before_they_are_built(
    roomy: Client,
) -> None:
    """A review: the count read the first ``records`` (one record) and msgspec built the
    400k of the second before its own 422."""
    body = b'{"source":"s","records":[{"features":[1,2,3,4]}],"records":[' + b"{}," * 400_000 + b"{}]}"
    response = await roomy.post(INGEST, data=io.BytesIO(body), headers={"Content-Type": "application/json"})
    problem = await _problem(response, 422)
    assert "the key 'records' given twice" in problem["detail"]


async def test_a_huge_json_batch_giving_records_twice_and_a_number_simdjson_refuses_is_422(
    roomy: Client,
) -> None:
    """A review: with a number past 64 bits the count went by the bytes, which read
    only the last ``records``, and msgspec built the 400k of the first."""
    last = b'{"features":[1,2,3,4],"label":1234567890123456789012345}'
    body = b'{"source":"s","records":[' + b"{}," * 400_000 + b'{}],"records":[' + last + b"]}"
    response = await roomy.post(INGEST, data=io.BytesIO(body), headers={"Content-Type": "application/json"})
    problem = await _problem(response, 422)
    assert "not an object of 3 members" in problem["detail"]


async def test_a_huge_json_batch_starting_with_a_byte_order_mark_is_400(roomy: Client) -> None:
    """A review: simdjson takes the mark, msgspec refuses it: the count said 422."""
    body = _empty_records(400_000, head=b"\xef\xbb\xbf")
    response = await roomy.post(INGEST, data=io.BytesIO(body), headers={"Content-Type": "application/json"})
    await _problem(response, 400)


# -- size limits ----------------------------------------------------------------------


async def test_declared_oversized_body_is_413_before_the_body_is_sent(client: Client) -> None:
    """The answer comes while the client has sent 100 bytes of a declared gigabyte."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        started = time.monotonic()
        writer.write(
            b"POST /api/v2/ingest HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
            + b'{"source": "s", "records": [' + b" " * 72
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 413 ")
        assert b"Content-Type: application/problem+json" in head
        assert time.monotonic() - started < 2
    finally:
        writer.close()
        await writer.wait_closed()
    await _assert_still_serving(client)


async def test_oversized_chunked_body_without_length_is_413(client: Client) -> None:
    """Twice the limit, then a body that never ends: the 413 must not wait for its end."""

    async def never_ending_body() -> AsyncIterator[bytes]:
        yield b'{"source": "s", "records": ['
        for _ in range(32):
            yield b" " * (64 * 1024)
        await asyncio.Event().wait()

    response = await client.post(
        INGEST, data=never_ending_body(), headers={"Content-Type": "application/json"}
    )
    problem = await _problem(response, 413)
    assert str(MAX_BODY) in problem["detail"]
    await _assert_still_serving(client)


async def test_gzip_bomb_is_413_on_its_decompressed_size(client: Client) -> None:
    bomb = gzip.compress(b'{"source": "s", "records": [' + b" " * (8 * MAX_BODY) + b"]}")
    assert len(bomb) < MAX_BODY / 4
    response = await client.post(
        INGEST,
        data=bomb,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    await _problem(response, 413)
    await _assert_still_serving(client)


async def test_gzip_body_is_accepted(client: Client, settings: Settings) -> None:
    body = gzip.compress(msgspec.json.encode(_batch(_record(1), _record(2))))
    response = await client.post(
        INGEST, data=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
    )
    assert response.status == 202
    assert (await response.json())["records_accepted"] == 2
    assert [r["record_id"] for r in _stored(settings)] == ["r-1", "r-2"]


async def test_gzip_msgpack_body_is_accepted(client: Client) -> None:
    body = gzip.compress(msgspec.msgpack.encode(_batch(_record(1))))
    response = await client.post(
        INGEST, data=body, headers={**MSGPACK, "Content-Encoding": "gzip"}
    )
    assert response.status == 202


@pytest.mark.parametrize("encoding", ["br", "zstd"])
async def test_br_and_zstd_bodies_are_accepted(client: Client, encoding: str) -> None:
    raw = msgspec.json.encode(_batch(_record(1)))
    if encoding == "br":
        import brotli

        body = brotli.compress(raw)
    else:
        from backports import zstd

        body = zstd.compress(raw)
    response = await client.post(
        INGEST, data=body, headers={"Content-Type": "application/json", "Content-Encoding": encoding}
    )
    assert response.status == 202
    assert (await response.json())["records_accepted"] == 1


def _corrupted(data: bytes) -> bytes:
    """The gzip header intact, the deflate stream behind it broken."""
    return data[:10] + b"\xff" * 50 + data[60:]


@pytest.mark.parametrize(
    "body",
    [
        _corrupted(gzip.compress(msgspec.json.encode(_batch(*(_record(i) for i in range(50)))))),
        b"plain bytes, not gzip",
    ],
    ids=["corrupt", "not-gzip"],
)
async def test_undecompressable_gzip_body_is_400_and_the_connection_closes(
    client: Client, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    response = await client.post(
        INGEST, data=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
    )
    problem = await _problem(response, 400)
    assert "content-encoding" in problem["detail"].lower()
    assert response.headers["Connection"] == "close"
    await _assert_still_serving(client)
    # The client's error, answered: not read again after the answer and logged by aiohttp
    # as an unhandled exception with its traceback.
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []


async def test_undecompressable_gzip_stream_is_400(client: Client) -> None:
    response = await client.post(
        "/api/v2/ingest/stream?source=s",
        data=b"plain bytes, not gzip",
        headers={"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"},
    )
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    await _assert_still_serving(client)


async def test_empty_body_is_400(client: Client) -> None:
    response = await client.post(INGEST, data=b"", headers={"Content-Type": "application/json"})
    await _problem(response, 400)


# -- hostile shapes -------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"source": "s", "records": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}",
        b'{"source": "s", "records": [{"features": [1, 2, 3, 4], "metadata": {"k": '
        + b'{"k": ' * 100_000
        + b"}" * 100_000
        + b"}}]}",
    ],
    ids=["top-level", "in-records", "in-metadata"],
)
async def test_100k_deep_nested_json_is_4xx(client: Client, body: bytes) -> None:
    response = await client.post(INGEST, data=body, headers={"Content-Type": "application/json"})
    assert response.content_type == "application/problem+json"
    assert response.status in (400, 422)
    await _assert_still_serving(client)


async def test_100k_deep_nested_msgpack_is_4xx(client: Client) -> None:
    response = await client.post(INGEST, data=b"\x91" * 100_000 + b"\x90", headers=MSGPACK)
    assert response.content_type == "application/problem+json"
    assert response.status in (400, 422)
    await _assert_still_serving(client)


async def test_huge_feature_array_is_rejected_alone(client: Client) -> None:
    huge = {"record_id": "huge", "features": [0.5] * 100_000}
    response = await client.post(INGEST, json=_batch(_record(0), huge))
    assert response.status == 202
    body = await response.json()
    assert (body["records_accepted"], body["records_rejected"]) == (1, 1)
    [error] = body["errors"]
    assert error["index"] == 1 and "features" in error["error"]


async def test_batch_of_only_a_huge_feature_array_is_422(client: Client) -> None:
    response = await client.post(INGEST, json=_batch({"features": [0.5] * 100_000}))
    body = await _problem(response, 422)
    assert body["errors"][0]["loc"] == "records[0].features"
    await _assert_still_serving(client)


# -- one bad record costs only itself -------------------------------------------------


async def test_nan_and_inf_via_msgpack_are_rejected_per_record(
    client: Client, settings: Settings
) -> None:
    records = [
        _record(0),
        _record(1, features=[1.0, float("nan"), 0.0, 0.0]),
        _record(2, features=[float("inf"), 0.0, 0.0, 0.0]),
        _record(3, features=[0.0, 0.0, 0.0, float("-inf")]),
        _record(4, label=float("nan")),
        _record(5),
        _record(6, metadata={"score": float("inf")}),
    ]
    response = await client.post(INGEST, data=msgspec.msgpack.encode(_batch(*records)), headers=MSGPACK)
    assert response.status == 202
    body = await response.json()
    assert (body["records_accepted"], body["records_rejected"]) == (2, 5)
    errors = {e["index"]: e for e in body["errors"]}
    assert sorted(errors) == [1, 2, 3, 4, 6]
    assert "features[1]" in errors[1]["error"] and "finite" in errors[1]["error"]
    assert "features[0]" in errors[2]["error"]
    assert "features[3]" in errors[3]["error"]
    assert "label" in errors[4]["error"]
    assert "metadata['score']" in errors[6]["error"]
    assert errors[1]["record_id"] == "r-1"
    assert [r["record_id"] for r in _stored(settings)] == ["r-0", "r-5"]


async def test_wrong_field_type_costs_only_that_record(client: Client, settings: Settings) -> None:
    records = [_record(0), _record(1, features="1,2,3,4"), _record(2, label="high"), _record(3)]
    response = await client.post(INGEST, json=_batch(*records))
    assert response.status == 202
    body = await response.json()
    assert (body["records_accepted"], body["records_rejected"]) == (2, 2)
    assert [e["index"] for e in body["errors"]] == [1, 2]
    assert "features" in body["errors"][0]["error"]
    assert "label" in body["errors"][1]["error"]
    assert [r["record_id"] for r in _stored(settings)] == ["r-0", "r-3"]


async def test_record_that_is_not_an_object_costs_only_itself(client: Client) -> None:
    response = await client.post(INGEST, json=_batch(_record(0), [1, 2, 3, 4], "x", None))
    assert response.status == 202
    body = await response.json()
    assert [e["index"] for e in body["errors"]] == [1, 2, 3]


async def test_unknown_record_field_costs_only_that_record(client: Client) -> None:
    response = await client.post(INGEST, json=_batch(_record(0), _record(1, colour="red")))
    assert response.status == 202
    [error] = (await response.json())["errors"]
    assert error["index"] == 1 and "colour" in error["error"]


async def test_wrong_dimension_costs_only_that_record(client: Client) -> None:
    response = await client.post(INGEST, json=_batch(_record(0), _record(1, features=[1.0] * 5)))
    assert response.status == 202
    [error] = (await response.json())["errors"]
    assert error["index"] == 1 and error["record_id"] == "r-1"
    assert "allowed dimensions are 4" in error["error"]


async def test_value_outside_the_configured_range_costs_only_that_record(
    app_client: AppClientFactory, make_settings: Callable[..., Settings]
) -> None:
    client = await app_client(make_settings(feature_dims=(4,), feature_min=-1.0, feature_max=1.0, **OPEN))
    records = [
        _record(0, features=[0.0, 0.5, -0.5, 1.0]),
        _record(1, features=[0.0, 0.0, 0.0, 1.5]),
        _record(2, features=[-2.0, 0.0, 0.0, 0.0]),
    ]
    response = await client.post(INGEST, json=_batch(*records))
    assert response.status == 202
    body = await response.json()
    assert [e["index"] for e in body["errors"]] == [1, 2]
    assert "maximum" in body["errors"][0]["error"]
    assert "minimum" in body["errors"][1]["error"]


@pytest.mark.parametrize(
    "stamp",
    ["yesterday", "2024-13-01T00:00:00Z", "2024-01-01T00:00:00", -1e12, 1e15, True],
    ids=["words", "month-13", "no-offset", "epoch-before-year-1", "far-future-epoch", "bool"],
)
async def test_bad_timestamp_costs_only_that_record(
    client: Client, settings: Settings, stamp: object
) -> None:
    response = await client.post(INGEST, json=_batch(_record(0), _record(1, timestamp=stamp)))
    assert response.status == 202
    [error] = (await response.json())["errors"]
    assert error["index"] == 1 and "timestamp" in error["error"]
    assert error["record_id"] == "r-1"  # a record rejected by the schema is still named
    assert [r["record_id"] for r in _stored(settings)] == ["r-0"]


@pytest.mark.parametrize("record_id", [7, "", "x" * 129, "has space"], ids=["int", "empty", "long", "space"])
async def test_a_rejected_record_with_an_invalid_id_is_reported_without_it(
    client: Client, record_id: object
) -> None:
    bad = {**_record(1, timestamp="yesterday"), "record_id": record_id}
    response = await client.post(INGEST, json=_batch(_record(0), bad))
    assert response.status == 202
    [error] = (await response.json())["errors"]
    assert error["index"] == 1 and error["record_id"] is None


async def test_epoch_and_rfc3339_timestamps_are_stored_as_rfc3339_utc(
    client: Client, settings: Settings
) -> None:
    records = [
        _record(0, timestamp=1_700_000_000),
        _record(1, timestamp=1_700_000_000.25),
        _record(2, timestamp="2024-03-01T12:00:00+02:00"),
        _record(3, timestamp="2024-03-01T12:00:00.5Z"),
        _record(4),
    ]
    before = datetime.now().astimezone()
    response = await client.post(INGEST, json=_batch(*records))
    assert response.status == 202
    stamps = [r["timestamp"] for r in _stored(settings)]
    assert stamps[:4] == [
        "2023-11-14T22:13:20Z",
        "2023-11-14T22:13:20.250000Z",
        "2024-03-01T10:00:00Z",
        "2024-03-01T12:00:00.500000Z",
    ]
    # Absent: the time of ingestion, in UTC.
    assert stamps[4].endswith("Z")
    assert datetime.fromisoformat(stamps[4]) >= before.replace(microsecond=0)


async def test_msgpack_epoch_timestamp_is_stored_as_rfc3339_utc(
    client: Client, settings: Settings
) -> None:
    body = msgspec.msgpack.encode(_batch(_record(0, timestamp=0)))
    response = await client.post(INGEST, data=body, headers=MSGPACK)
    assert response.status == 202
    assert _stored(settings)[0]["timestamp"] == "1970-01-01T00:00:00Z"


async def test_epoch_seconds_before_1970_are_stored_as_that_moment(
    client: Client, settings: Settings
) -> None:
    """As the same moment in RFC 3339 is (a review: the text was taken, the number refused)."""
    records = [_record(0, timestamp=-86_400.5), _record(1, timestamp="1969-12-30T23:59:59.5Z")]
    response = await client.post(INGEST, json=_batch(*records))
    assert response.status == 202, await response.text()
    assert [r["timestamp"] for r in _stored(settings)] == ["1969-12-30T23:59:59.500000Z"] * 2


async def test_epoch_seconds_before_year_1_are_rejected(client: Client) -> None:
    response = await client.post(INGEST, json=_batch(_record(0), _record(1, timestamp=-62135596801)))
    assert response.status == 202
    [error] = (await response.json())["errors"]
    assert error["index"] == 1 and "timestamp" in error["error"]


@pytest.mark.parametrize(
    ("key", "located"),
    [(1, " at metadata"), ("k" * 65, f" at metadata[{'k' * 65!r}]")],
    ids=["not-a-string", "too-long"],
)
async def test_a_bad_metadata_key_is_named_as_a_key_of_metadata(
    client: Client, key: object, located: str
) -> None:
    """msgspec's own location (`key` in `$.metadata`) reached the client as it was."""
    body = msgspec.msgpack.encode(_batch(_record(0), _record(1, metadata={key: "x"})))
    response = await client.post(INGEST, data=body, headers=MSGPACK)
    assert response.status == 202
    [error] = (await response.json())["errors"]
    assert error["index"] == 1
    assert error["error"].startswith("a key: Expected `str`")
    assert error["error"].endswith(located)


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
@pytest.mark.parametrize(
    "value", ["x" * 1025, [1], {"a": 1}, 2**63], ids=["too-long", "a-list", "a-map", "past-int64"]
)
async def test_a_refused_metadata_value_is_named_by_its_key(
    client: Client, fmt: str, value: object
) -> None:
    """A review: msgspec locates it as ``metadata[...]``, which left the producer to
    guess which of 32 items was wrong."""
    records = [_record(0), _record(1, metadata={"site": "a", "gain": value, "z": 1})]
    if fmt == "json":
        response = await client.post(INGEST, json=_batch(*records))
    else:
        response = await client.post(INGEST, data=msgspec.msgpack.encode(_batch(*records)), headers=MSGPACK)
    assert response.status == 202
    [error] = (await response.json())["errors"]
    assert error["index"] == 1
    assert error["error"].endswith(" at metadata['gain']"), error


async def test_a_refused_metadata_item_of_a_huge_record_is_not_looked_for(client: Client) -> None:
    """Naming the key decodes the record's metadata again: past a valid record's size
    (here a key too long after 20,000 filler keys) the error keeps msgspec's location."""
    metadata = {**{f"k{i}": 1 for i in range(20_000)}, "x" * 65: 1}
    response = await client.post(INGEST, json=_batch(_record(0), _record(1, metadata=metadata)))
    assert response.status == 202
    [error] = (await response.json())["errors"]
    assert error["error"].endswith(" at metadata"), error["error"][-80:]


async def test_every_record_rejected_for_a_metadata_value_is_located_at_metadata(
    client: Client,
) -> None:
    response = await client.post(INGEST, json=_batch(_record(0, metadata={"gain": [1]})))
    body = await _problem(response, 422)
    [error] = body["errors"]
    assert error["loc"] == "records[0].metadata"
    assert error["msg"].endswith(" at metadata['gain']")


async def test_too_many_metadata_items_cost_only_that_record(client: Client) -> None:
    too_many = {f"k{i}": i for i in range(33)}
    records = [_record(0, metadata={"ok": True}), _record(1, metadata=too_many)]
    response = await client.post(INGEST, json=_batch(*records))
    assert response.status == 202
    [error] = (await response.json())["errors"]
    assert error["index"] == 1 and "metadata" in error["error"]


class CountingDecoder:
    """Stands in for a msgspec decoder, counting its calls."""

    def __init__(self, decoder: Any) -> None:
        self.decoder = decoder
        self.calls = 0

    def decode(self, body: bytes) -> Any:
        self.calls += 1
        return self.decoder.decode(body)


async def test_a_schema_error_on_the_fast_path_goes_straight_to_record_by_record(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: a record of a million metadata keys was decoded three times (the fast
    path, the whole batch, then record by record), 1.1 s of the event loop; the whole
    batch's typed decoding could only fail as the fast path's did."""
    whole = CountingDecoder(validation._batch_decoders[Format.JSON])
    monkeypatch.setitem(validation._batch_decoders, Format.JSON, whole)
    too_many = {f"k{i}": i for i in range(1000)}
    response = await client.post(INGEST, json=_batch(_record(0), _record(1, metadata=too_many)))
    assert response.status == 202
    [error] = (await response.json())["errors"]
    assert error["index"] == 1 and "metadata" in error["error"]
    assert whole.calls == 0


async def test_a_record_larger_than_any_the_schema_takes_is_rejected_undecoded(
    app_client: AppClientFactory, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(validation, "MAX_BATCH_RECORD_BYTES", 64 * 1024)
    settings = make_settings(feature_dims=(4,), **OPEN)
    client = await app_client(settings)
    huge = {f"k{i}": "v" for i in range(20_000)}  # 240 KB of metadata
    response = await client.post(INGEST, json=_batch(_record(0), _record(1, metadata=huge)))
    assert response.status == 202
    answer = await response.json()
    assert answer["records_accepted"] == 1
    [error] = answer["errors"]
    assert error["index"] == 1 and error["record_id"] is None
    assert "exceed the limit of 65536" in error["error"]
    assert [record["record_id"] for record in _stored(settings)] == ["r-0"]


def _padded_record(i: int, pad: int) -> bytes:
    """A valid record of 4 features whose JSON text is ``pad`` blanks longer."""
    return f'{{"record_id":"r-{i}","features":[0.5,{" " * pad}0.25,1.5,2.5]}}'.encode()


def _json_batch(*records: bytes) -> bytes:
    return b'{"source":"sensors","records":[' + b",".join(records) + b"]}"


@pytest.mark.parametrize(
    "neighbours",
    [[], [b'{"record_id":"bad","features":"x"}'], [b'{"record_id":"r-7","features":[1.0,2.0,3.0,4.0]}']],
    ids=["alone", "beside-a-bad-record", "beside-a-good-record"],
)
async def test_a_record_over_the_limit_is_rejected_whatever_its_neighbours(
    app_client: AppClientFactory,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    neighbours: list[bytes],
) -> None:
    """A review: the paths that decode a batch whole measured no record, so a record
    of 1.1 MB was accepted alone and refused beside a bad one."""
    monkeypatch.setattr(validation, "MAX_BATCH_RECORD_BYTES", 16 * 1024)
    settings = make_settings(feature_dims=(4,), **OPEN)
    client = await app_client(settings)
    body = _json_batch(_padded_record(0, 20_000), *neighbours)
    response = await client.post(INGEST, data=body, headers={"Content-Type": "application/json"})
    answer = await response.json(content_type=None)
    # A 202 lists rejected records' ``error``; the 422 of a batch rejected whole, ``msg``.
    assert response.status == (202 if len(neighbours) == 1 and b"r-7" in neighbours[0] else 422)
    oversized = [error for error in answer["errors"] if error["index"] == 0]
    assert oversized and "exceed the limit of 16384" in oversized[0].get("error", oversized[0].get("msg"))
    assert "r-0" not in [record["record_id"] for record in _stored(settings)]


async def test_a_msgpack_record_over_the_limit_is_rejected_on_the_packed_path_too(
    app_client: AppClientFactory, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(validation, "MAX_BATCH_RECORD_BYTES", 16 * 1024)
    settings = make_settings(feature_dims=(4,), **OPEN)
    client = await app_client(settings)
    large = _record(0, metadata={f"k{i}": "v" * 1000 for i in range(20)})  # ~20 KB, valid
    body = msgspec.msgpack.encode(_batch(large, *(_record(i) for i in range(1, 40))))
    response = await client.post(INGEST, data=body, headers=MSGPACK)
    assert response.status == 202
    answer = await response.json()
    assert answer["records_accepted"] == 39
    [error] = answer["errors"]
    assert error["index"] == 0 and "exceed the limit of 16384" in error["error"]


@pytest.mark.parametrize("size", ["small", "packed"])
async def test_features_padded_with_blanks_are_written_plainly_not_as_sent(
    app_client: AppClientFactory, make_settings: Callable[..., Settings], size: str
) -> None:
    """A review: a JSON batch's features went to the JSON value as the text they came
    as, so one record's megabyte of blanks became a megabyte Kafka value."""
    settings = make_settings(feature_dims=(4,), max_body_bytes=MAX_BODY, **OPEN)
    client = await app_client(settings)
    # Packed: among compact neighbours, whose unused room once covered the padding.
    others = [] if size == "small" else [_padded_record(i, 0) for i in range(1, 2000)]
    body = _json_batch(*others, _padded_record(0, 100_000))
    response = await client.post(INGEST, data=body, headers={"Content-Type": "application/json"})
    assert response.status == 202
    log = Path(worker_data_dir(settings)) / "log"
    [padded] = [entry.record.value for entry in read_log(log) if entry.record.key == b"r-0"]
    assert len(padded) < 500
    assert msgspec.json.decode(padded)["features"] == [0.5, 0.25, 1.5, 2.5]


@pytest.mark.parametrize(
    "metadata",
    [{"k": "v" * 1025}, {"k" * 65: "v"}, {"k": [1, 2]}, {"k": {"nested": 1}}, {"k": None}],
    ids=["long-value", "long-key", "list-value", "map-value", "null-value"],
)
async def test_oversized_or_wrongly_typed_metadata_costs_only_that_record(
    client: Client, metadata: dict[str, Any]
) -> None:
    response = await client.post(INGEST, json=_batch(_record(0), _record(1, metadata=metadata)))
    assert response.status == 202
    [error] = (await response.json())["errors"]
    assert error["index"] == 1 and "metadata" in error["error"]


@pytest.mark.parametrize("record_id", ["", "with space", "new\nline", "trailing-newline\n", "x" * 129])
async def test_invalid_record_id_costs_only_that_record(client: Client, record_id: str) -> None:
    response = await client.post(INGEST, json=_batch(_record(0), _record(1, record_id=record_id)))
    assert response.status == 202
    [error] = (await response.json())["errors"]
    assert error["index"] == 1 and "record_id" in error["error"]


async def test_record_id_is_generated_when_absent(client: Client, settings: Settings) -> None:
    records = [{"features": [1.0, 2.0, 3.0, 4.0]}, {"features": [5.0, 6.0, 7.0, 8.0]}]
    response = await client.post(INGEST, json=_batch(*records))
    assert response.status == 202
    stored = _stored(settings)
    ids = [r["record_id"] for r in stored]
    assert len(ids) == len(set(ids)) == 2
    assert all(len(i) >= 16 for i in ids)
    keys = [e.record.key.decode() for e in read_log(Path(worker_data_dir(settings)) / "log")]
    assert keys == ids  # the generated id is also the record's key


async def test_every_record_rejected_is_422_with_per_record_errors_and_writes_nothing(
    client: Client, settings: Settings
) -> None:
    records = [_record(0, features=[1.0]), _record(1, features="x"), {"features": [float(2)] * 7}]
    response = await client.post(INGEST, json=_batch(*records))
    body = await _problem(response, 422)
    # Each names the field, as the contract's example: "records[3].features".
    assert [e["loc"] for e in body["errors"]] == [
        "records[0].features",
        "records[1].features",
        "records[2].features",
    ]
    assert [e["index"] for e in body["errors"]] == [0, 1, 2]
    assert body["errors"][0]["record_id"] == "r-0"
    assert _stored(settings) == []
    await _assert_still_serving(client)


async def test_every_record_rejected_gives_each_error_the_shape_of_a_202s_errors(
    client: Client,
) -> None:
    """A review: the 422's entries left out ``record_id`` when the record had none
    readable, where a 202's errors say ``null``; a client reads both lists alike."""
    response = await client.post(INGEST, json=_batch({"features": "x"}))
    body = await _problem(response, 422)
    [error] = body["errors"]
    assert error["index"] == 0
    assert error["record_id"] is None
    assert error["error"] == error["msg"]
    assert error["loc"] == "records[0].features"


async def test_accepted_records_are_stored_with_source_and_headers(
    client: Client, settings: Settings
) -> None:
    record = _record(7, label=0.5, metadata={"site": "a", "n": 3, "x": 1.5, "ok": True})
    response = await client.post(INGEST, json=_batch(record))
    tracking_id = (await response.json())["tracking_id"]
    [entry] = read_log(Path(worker_data_dir(settings)) / "log")
    assert entry.record.key == b"r-7"
    assert dict(entry.record.headers) == {
        "source": b"sensors",
        "tracking_id": tracking_id.encode(),
        "schema_version": b"1",
    }
    value = msgspec.json.decode(entry.record.value)
    assert value["source"] == "sensors"
    assert value["features"] == record["features"]
    assert value["label"] == 0.5 and value["metadata"] == record["metadata"]


# -- negotiation ----------------------------------------------------------------------


async def test_accept_msgpack_gets_a_msgpack_response(client: Client) -> None:
    response = await client.post(
        INGEST,
        data=msgspec.msgpack.encode(_batch(_record(0), _record(1, features=[1.0]))),
        headers={**MSGPACK, "Accept": "application/msgpack"},
    )
    assert response.status == 202
    assert response.content_type == "application/msgpack"
    body = msgspec.msgpack.decode(await response.read())
    assert (body["records_accepted"], body["records_rejected"]) == (1, 1)
    assert body["errors"][0]["index"] == 1


async def test_accept_msgpack_gets_msgpack_problem_documents(client: Client) -> None:
    response = await client.post(
        INGEST, json={"source": "s", "records": []}, headers={"Accept": "application/msgpack"}
    )
    assert response.status == 422
    assert response.content_type == "application/msgpack"
    problem = msgspec.msgpack.decode(await response.read())
    assert problem["status"] == 422 and problem["type"] == "/problems/validation-failed"
    assert problem["title"] and problem["errors"][0]["loc"] == "records"


async def test_json_preferred_over_msgpack_by_quality_gets_json(client: Client) -> None:
    response = await client.post(
        INGEST,
        json=_batch(),
        headers={"Accept": "application/msgpack;q=0.5, application/json"},
    )
    assert response.status == 202
    assert response.content_type == "application/json"


async def test_unsupported_content_encoding_is_415(app_client, make_settings) -> None:
    client = await app_client(make_settings(feature_dims=(4,)))
    response = await client.post(
        "/api/v2/ingest",
        data=b'{"source": "s", "records": [{"features": [1, 2, 3, 4]}]}',
        headers={"Content-Type": "application/json", "Content-Encoding": "compress"},
    )
    assert response.status == 415
    assert response.content_type == "application/problem+json"
    assert "gzip" in response.headers["Accept-Encoding"]


async def test_empty_body_is_400_not_a_hang(app_client, make_settings) -> None:
    client = await app_client(make_settings(feature_dims=(4,)))
    response = await client.post(
        "/api/v2/ingest", data=b"", headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    assert response.content_type == "application/problem+json"


@pytest.mark.parametrize("stamp", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"])
@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_a_timestamp_with_no_utc_time_rejects_its_record_only(
    client: Client, settings: Settings, stamp: str, fmt: str
) -> None:
    body = _batch(_record(1), _record(2, timestamp=stamp), _record(3))
    if fmt == "json":
        response = await client.post(INGEST, json=body)
    else:
        response = await client.post(INGEST, data=msgspec.msgpack.encode(body), headers=MSGPACK)
    assert response.status == 202, await response.text()
    answer = await response.json()
    assert answer["records_accepted"] == 2
    [error] = answer["errors"]
    assert error["index"] == 1 and error["record_id"] == "r-2"
    assert "timestamp" in error["error"]
    assert [r["record_id"] for r in _stored(settings)] == ["r-1", "r-3"]


async def test_a_lone_record_with_a_timestamp_with_no_utc_time_is_422(client: Client) -> None:
    response = await client.post(INGEST, json=_batch(_record(1, timestamp="9999-12-31T23:59:59-01:00")))
    problem = await _problem(response, 422)
    [error] = problem["errors"]
    assert error["loc"] == "records[0].timestamp" and error["msg"].startswith("timestamp is out of range")


async def test_a_rejected_records_location_names_the_field_at_fault(client: Client) -> None:
    records = [
        _record(0, label="high"),
        _record(1, metadata={"fw": "x" * 5000}),
        {"record_id": "r-2"},
    ]
    body = await _problem(await client.post(INGEST, json=_batch(*records)), 422)
    assert [e["loc"] for e in body["errors"]] == [
        "records[0].label",
        "records[1].metadata",
        "records[2].features",
    ]


@pytest.mark.parametrize("before", [False, True], ids=["first", "after-a-schema-error"])
async def test_a_batch_record_that_does_not_decode_is_400_wherever_it_is(
    client: Client, before: bool
) -> None:
    """A review: invalid UTF-8 in a record's string made the batch 400, unless a record
    before it had a schema error: then it was that record's rejection, the rest written."""
    bad = b"\x82\xa8features" + msgspec.msgpack.encode([1.0] * 4) + b"\xa9record_id\xa2\xff\xfe"
    schema_bad = msgspec.msgpack.encode({"features": "no"})
    good = msgspec.msgpack.encode({"features": [1.0, 2.0, 3.0, 4.0]})
    records = ([schema_bad] if before else []) + [bad, good]
    body = b"\x82\xa6source\xa1s\xa7records" + bytes([0x90 + len(records)]) + b"".join(records)
    response = await client.post(INGEST, data=body, headers=MSGPACK)
    assert response.status == 400, await response.text()


async def test_a_content_type_is_read_by_its_media_type_its_parameters_unparsed(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: aiohttp's parsing of a header of 1,600 parameters took 0.1 s of the
    event loop, each new header parsed again."""

    def parsed(*args: object) -> None:
        raise AssertionError("the Content-Type was parsed")

    monkeypatch.setattr(HeadersMixin, "_parse_content_type", parsed)
    content_type = "application/json;" + "a=b;" * 1600 + "u=1"
    body = msgspec.json.encode(_batch(_record(0)))
    response = await client.post(INGEST, data=body, headers={"Content-Type": content_type})
    assert response.status == 202, await response.read()


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_an_offset_written_without_its_colon_is_read_as_its_moment(
    client: Client, settings: Settings, fmt: str
) -> None:
    """ISO 8601's basic offset (``+0100``, Java's ``Z`` pattern) is not RFC 3339's, but
    names one moment: read as msgspec reads it, stored as RFC 3339 UTC (README)."""
    body = _batch(_record(1, timestamp="2024-01-01T00:00:00+0100"))
    if fmt == "json":
        response = await client.post(INGEST, json=body)
    else:
        response = await client.post(INGEST, data=msgspec.msgpack.encode(body), headers=MSGPACK)
    assert response.status == 202, await response.text()
    assert [record["timestamp"] for record in _stored(settings)] == ["2023-12-31T23:00:00Z"]
