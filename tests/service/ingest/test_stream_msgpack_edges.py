"""``POST /api/v2/ingest/stream`` with msgpack at its edges: a stream cut inside a
record, the timestamp extension, values nested too deep or containers larger than any
record has. msgpack records have no boundary to resume from: what cannot be decoded
ends the stream with a 400 that says what and how far the stream was written."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from mlgate.config import Settings, worker_data_dir
from mlgate.service.routes.ingest import STREAM_CHUNK_RECORDS
from mlgate.workers.sinks.local_log import read_log
from tests.conftest import AppClientFactory

Client = TestClient[web.Request, web.Application]
OPEN: dict[str, Any] = {"auth_disabled": True, "rate_limits_enabled": False}
STREAM = "/api/v2/ingest/stream?source=s"
MSGPACK = {"Content-Type": "application/msgpack"}


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(feature_dims=(4,), **OPEN)


@pytest.fixture
async def client(app_client: AppClientFactory, settings: Settings) -> Client:
    return await app_client(settings)


def _record(i: int, **fields: Any) -> dict[str, Any]:
    return {"record_id": f"r-{i}", "features": [1.0, 2.0, 3.0, 4.0], **fields}


def _packed(first: int, count: int) -> bytes:
    return b"".join(msgspec.msgpack.encode(_record(first + i)) for i in range(count))


def _stored(settings: Settings) -> dict[str, dict[str, Any]]:
    log = Path(worker_data_dir(settings)) / "log"
    return {
        entry.record.key.decode(): msgspec.json.decode(entry.record.value) for entry in read_log(log)
    }


async def _detail(client: Client, body: bytes, status: int) -> str:
    response = await client.post(STREAM, data=body, headers=MSGPACK)
    assert response.status == status, await response.text()
    detail: str = (await response.json(content_type=None))["detail"]
    return detail


# -- a stream cut inside a record ------------------------------------------------------


async def test_a_stream_cut_between_two_values_of_its_last_record_is_400(
    client: Client, settings: Settings
) -> None:
    last = msgpack.packb(_record(2, features=[1.0, 2.0, 3.0, 4.0], label=1.0))
    cut = last[: last.index(b"\x94") + 1 + 9 * 2]  # the map, its array and two floats
    detail = await _detail(client, _packed(0, 2) + cut, 400)
    assert "ends inside msgpack record 2" in detail
    assert "No record of this stream was written" in detail
    assert _stored(settings) == {}


async def test_a_stream_ending_in_a_lone_map_header_is_400(client: Client) -> None:
    detail = await _detail(client, _packed(0, 1) + b"\x85", 400)
    assert "ends inside msgpack record 1" in detail


async def test_a_stream_cut_after_written_chunks_says_how_many_were_written(
    client: Client,
) -> None:
    body = _packed(0, STREAM_CHUNK_RECORDS + 5) + b"\x82"
    detail = await _detail(client, body, 400)
    assert f"The first {STREAM_CHUNK_RECORDS} records accepted" in detail
    assert f"no record from index {STREAM_CHUNK_RECORDS} on was written" in detail


# -- the timestamp extension -----------------------------------------------------------


async def test_a_timestamp_extension_is_stored_as_the_batch_route_stores_it(
    client: Client, settings: Settings
) -> None:
    stamp = msgpack.Timestamp(1_700_000_000, 123_456_789)
    batch = msgpack.packb({"source": "s", "records": [_record(0, timestamp=stamp)]})
    response = await client.post("/api/v2/ingest", data=batch, headers=MSGPACK)
    assert response.status == 202, await response.text()
    response = await client.post(STREAM, data=msgpack.packb(_record(1, timestamp=stamp)), headers=MSGPACK)
    assert response.status == 202, await response.text()
    stored = _stored(settings)
    assert stored["r-1"]["timestamp"] == stored["r-0"]["timestamp"]
    assert stored["r-1"]["timestamp"].startswith("2023-11-14T22:13:20.12345")


async def test_a_timestamp_extension_out_of_range_rejects_its_record_only(client: Client) -> None:
    far = msgpack.packb(_record(1, timestamp=msgpack.Timestamp(2**40, 0)))
    body = _packed(0, 1) + far + _packed(2, 1)
    response = await client.post(STREAM, data=body, headers=MSGPACK)
    assert response.status == 202, await response.text()
    answer = await response.json()
    assert (answer["records_accepted"], answer["records_rejected"]) == (2, 1)
    assert answer["errors"][0]["index"] == 1 and "out of range" in answer["errors"][0]["error"]


# -- values no record can be -----------------------------------------------------------


async def test_a_value_nested_too_deep_is_400_saying_so_and_what_was_written(
    client: Client, settings: Settings
) -> None:
    body = _packed(0, 2) + b"\x91" * 2000 + b"\x90" + _packed(2, 1)
    detail = await _detail(client, body, 400)
    assert "not valid msgpack at record 2: arrays or maps nested more than" in detail
    # The records before it, read but not yet written with their chunk, are not written.
    assert "No record of this stream was written" in detail
    assert _stored(settings) == {}


async def test_a_value_nested_too_deep_after_written_chunks_says_from_where_none_was(
    client: Client,
) -> None:
    body = _packed(0, STREAM_CHUNK_RECORDS + 3) + b"\x91" * 2000 + b"\x90"
    detail = await _detail(client, body, 400)
    assert f"at record {STREAM_CHUNK_RECORDS + 3}: arrays or maps nested" in detail
    assert f"The first {STREAM_CHUNK_RECORDS} records accepted" in detail
    assert f"no record from index {STREAM_CHUNK_RECORDS} on was written" in detail


async def test_a_byte_that_starts_no_value_is_400_saying_so(client: Client) -> None:
    detail = await _detail(client, _packed(0, 1) + b"\xc1", 400)
    assert "at record 1: a byte that starts no msgpack value" in detail


async def test_a_record_of_a_hundred_thousand_empty_arrays_is_rejected_on_its_own(
    client: Client,
) -> None:
    body = _packed(0, 1) + msgspec.msgpack.encode({"features": [[]] * 100_000}) + _packed(1, 1)
    response = await client.post(STREAM, data=body, headers=MSGPACK)
    assert response.status == 202, await response.text()
    answer = await response.json()
    assert answer["records_accepted"] == 2
    assert [error["index"] for error in answer["errors"]] == [1]


async def test_an_array_header_claiming_more_than_the_stream_holds_is_400(
    client: Client,
) -> None:
    body = _packed(0, 1) + b"\x81\xa8features\xdd\xff\xff\xff\xff"
    detail = await _detail(client, body, 400)
    assert "not a whole record" in detail


async def test_a_half_sent_record_of_a_million_empty_arrays_holds_only_its_bytes(
    app_client: AppClientFactory, make_settings: Callable[..., Settings]
) -> None:
    """A review: a record cut by a chunk's end was decoded as far as it went, and its
    million empty arrays (70 MB) stayed built while the stream waited for the rest."""
    client = await app_client(make_settings(feature_dims=(4,), **OPEN))
    head = b"\x81\xa8features\xdd" + (1_000_000).to_bytes(4, "big")
    go_on = asyncio.Event()
    sent = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield head + b"\x90" * 900_000
        sent.set()
        await go_on.wait()
        yield b"\x90" * 100_000 + _packed(1, 1)

    tracemalloc.start()
    try:
        posted = asyncio.ensure_future(client.post(STREAM, data=body(), headers=MSGPACK))
        await sent.wait()
        await asyncio.sleep(0.2)  # the server has read and scanned what was sent
        grown = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    go_on.set()
    response = await posted
    assert grown < 8 * 1024 * 1024, f"{grown} bytes traced while the stream waited"
    assert response.status == 202, await response.text()
    answer = await response.json()
    assert (answer["records_accepted"], answer["records_rejected"]) == (1, 1)


async def test_fields_over_their_limits_reject_their_own_record_as_on_the_batch_route(
    app_client: AppClientFactory, make_settings: Callable[..., Settings]
) -> None:
    """The decoding limits are no tighter than a record's: 4,097 features, 33 metadata
    items or a metadata text too long is that record's rejection, not the stream's 400."""
    client = await app_client(make_settings(feature_dims=(4,), **OPEN))
    good = {"features": [0.5] * 4}
    bad = [
        {"features": [0.5] * 4097},
        {"features": [0.5] * 4, "metadata": {f"k{i}": i for i in range(33)}},
        {"features": [0.5] * 4, "metadata": {"k": "x" * 5000}},
        {"features": [0.5] * 65_537},  # a review: over the first decoding limits
        {"features": [0.5] * 4, "metadata": {f"k{i}": i for i in range(513)}},
        {"features": [0.5] * 4, "extra": list(range(70_000))},
    ]
    body = b"".join(msgpack.packb(record) for record in [good, *bad, good])
    response = await client.post(STREAM, data=body, headers=MSGPACK)
    assert response.status == 202, await response.text()
    answer = await response.json()
    assert answer["records_accepted"] == 2
    assert [error["index"] for error in answer["errors"]] == [1, 2, 3, 4, 5, 6]


async def test_the_longest_metadata_text_a_record_may_hold_fits_the_decoding_limits(
    app_client: AppClientFactory, make_settings: Callable[..., Settings]
) -> None:
    client = await app_client(make_settings(feature_dims=(4096,), **OPEN))
    record = {
        "record_id": "big",
        "features": [0.5] * 4096,
        "metadata": {f"k{i}": "\U0001f600" * 1024 for i in range(32)},
    }
    response = await client.post(STREAM, data=msgpack.packb(record), headers=MSGPACK)
    assert response.status == 202, await response.text()
    assert (await response.json())["records_accepted"] == 1


async def test_a_record_that_does_not_decode_costs_only_itself_on_a_stream(client: Client) -> None:
    """Its framing holds (found by msgpack's skip), as an NDJSON stream's lines do:
    invalid UTF-8 in a string rejects that record, and the records after it stay."""
    bad = b"\x82\xa8features" + msgspec.msgpack.encode([1.0] * 4) + b"\xa9record_id\xa2\xff\xfe"
    body = _packed(0, 1) + bad + _packed(1, 1)
    response = await client.post(STREAM, data=body, headers=MSGPACK)
    assert response.status == 202, await response.text()
    answer = await response.json()
    assert answer["records_accepted"] == 2
    assert [error["index"] for error in answer["errors"]] == [1]
