"""The workload benchmark's traffic is what workload.md describes and what mlgate accepts:
every field present, record ids unique per record and per request, JSON features as
shortest float32 reprs; its steady-state edges leave out the warm-up and the last,
partial second."""

from __future__ import annotations

import re
from typing import Any

import msgpack
import msgspec
import numpy as np
import pytest

from bench.payload import BodyFormat, RequestBodies
from bench.predict import LoadResult
from bench.workload import Row, decode_bound_note, edge_rates, per_core_used
from mlgate.config import load_settings
from mlgate.service.http.codec import Format
from mlgate.service.ingest.validation import RecordValidator
from tests.conftest import AppClientFactory

RFC3339_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
FLAVOURS: list[tuple[BodyFormat, bool]] = [("msgpack", False), ("msgpack", True), ("json", False)]


def _decode(body: bytes, body_format: str) -> Any:
    return msgspec.json.decode(body) if body_format == "json" else msgpack.unpackb(body)


@pytest.mark.parametrize(("body_format", "single_float"), FLAVOURS)
def test_realistic_records_pass_mlgates_validator_with_every_field(
    body_format: BodyFormat, single_float: bool
) -> None:
    bodies = RequestBodies(
        2, 50, 128, shape="realistic", body_format=body_format, single_float=single_float
    )
    validator = RecordValidator(load_settings({}, feature_dims=(128,)))
    fmt = Format.JSON if body_format == "json" else Format.MSGPACK

    source, items = validator.decode_batch(bytes(bodies.body(3)), fmt)
    validated = validator.validate(source, items)

    assert validated.errors == []
    assert len(validated.accepted) == 50
    for record in _decode(bytes(bodies.body(3)), body_format)["records"]:
        assert set(record) == {"record_id", "timestamp", "features", "label", "metadata"}
        assert RFC3339_MS_Z.match(record["timestamp"])
        assert len(record["features"]) == 128
        assert record["label"] is None or isinstance(record["label"], float)
        assert set(record["metadata"]) == {"device", "region", "fw", "calibrated"}
    labels = [r.label for r in validated.accepted]
    assert None in labels and any(label is not None for label in labels)


def test_msgpack_features_are_float64_unless_single_float() -> None:
    double = bytes(RequestBodies(1, 1, 128, shape="realistic").body(0))
    single = bytes(RequestBodies(1, 1, 128, shape="realistic", single_float=True).body(0))

    assert double.count(b"\xcb") >= 128  # msgpack float 64
    assert single.count(b"\xca") >= 128  # msgpack float 32


def test_json_features_are_the_shortest_float32_reprs() -> None:
    body = bytes(RequestBodies(1, 3, 128, shape="realistic", body_format="json").body(0))
    features = re.search(rb'"features":\[([^\]]*)\]', body)
    assert features is not None

    for text in features.group(1).decode().split(","):
        value = np.float32(text)
        assert float(value) == float(np.float32(float(text)))
        assert text == str(value)


@pytest.mark.parametrize(
    ("body_format", "records"), [("msgpack", 500), ("json", 100), ("msgpack", 1)]
)
def test_stamped_record_ids_are_unique_per_record_and_per_request(
    body_format: BodyFormat, records: int
) -> None:
    bodies = RequestBodies(4, records, 128, shape="realistic", body_format=body_format)
    requests = 9

    ids = [
        record["record_id"]
        for number in range(requests)
        for record in _decode(bytes(bodies.body(number)), body_format)["records"]
    ]

    assert len(set(ids)) == len(ids) == requests * records


async def test_mlgate_accepts_every_record_of_a_realistic_batch(
    app_client: AppClientFactory, make_settings: Any
) -> None:
    client = await app_client(make_settings(feature_dims=(128,), rate_limits_enabled=False))
    bodies = RequestBodies(1, 100, 128, shape="realistic")

    first = await client.post(
        "/api/v2/ingest", data=bytes(bodies.body(1)), headers={"Content-Type": bodies.content_type}
    )
    second = await client.post(
        "/api/v2/ingest", data=bytes(bodies.body(2)), headers={"Content-Type": bodies.content_type}
    )

    assert first.status == second.status == 202
    assert (await first.json())["records_accepted"] == 100
    assert (await second.json())["records_accepted"] == 100  # fresh ids: no duplicate


def test_edge_rates_leave_out_the_warmup_and_the_last_partial_second() -> None:
    per_second = [1, 10, 10, 20, 30, 5]  # second 0 is warm-up, the last one partial

    assert edge_rates(per_second, warmup_s=1.0, edge_s=2.0) == (10.0, 25.0)


def test_a_limit_that_left_its_core_idle_gets_the_ratio_per_core_used() -> None:
    waiting = Row(scenario="ingest", mlgate=36_000, limit=36_000, unit="rec/s", usage=(0.9, 0.0), limit_usage=(0.45, 0.0))
    busy = Row(scenario="predict", mlgate=5_000, limit=10_000, unit="req/s", usage=(1.0, 0.0), limit_usage=(0.99, 0.0))
    [note] = per_core_used([waiting, busy])
    assert note.startswith("ingest: the limit used 0.45 of its core") and note.endswith("mlgate is 0.50x it")


def test_the_decode_bound_adds_a_requests_core_time_to_the_models_time_a_row() -> None:
    decoded = LoadResult(window_s=10.0, sent=40_000, dropped=0, statuses={"200": 40_000}, latencies_ms={}, errors=[])
    # 4,000 req/s on a whole core: 250 µs a request; batch 32 at 4,000 rows/s: 250 µs a row.
    note = decode_bound_note("heavy", decoded, 1.0, {"8": 2_000.0, "32": 4_000.0, "64": 9_000.0}, 8_000.0, 32)
    assert "250 µs of core a request" in note and "250 µs a row at batch 32" in note
    assert note.endswith("at most 2,000 rows/s: 0.25x onnxruntime's best batch")
