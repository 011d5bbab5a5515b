"""Semantic validation at ingest against a source profile, checked in Kafka; the
quality endpoint; the drift gauges."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from mlgate.config import Settings
from mlgate.service.ingest.validation import PACKED_FROM_BYTES
from mlgate.service.state import DRIFT_MONITOR, RELOAD_HOOKS
from tests.conftest import AppClientFactory
from tests.quality_data import DRIFTED, drifted, records, reference_sample, write_profile
from tests.support import KafkaBroker, KeyMaker, read_topic

Client = TestClient[web.Request, web.Application]
WINDOW = 1000


@pytest.fixture
def profiles_dir(tmp_path: Path) -> Path:
    return tmp_path / "profiles"


@pytest.fixture
def quality_settings(make_settings: Callable[..., Settings], profiles_dir: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return make_settings(
            profiles_dir=str(profiles_dir), feature_dims=(8,), drift_window_records=WINDOW,
            **overrides,
        )

    return make


def out_of_range_batch(prefix: str = "r") -> list[dict[str, object]]:
    batch = records(reference_sample(5, seed=7), prefix)
    batch[1]["features"][2] = 1e6  # type: ignore[index]
    batch[3]["features"][0] = -1e6  # type: ignore[index]
    batch[3]["features"][6] = 1e6  # type: ignore[index]
    return batch


async def ingest(client: Client, batch: list[dict[str, object]], source: str = "sensors") -> dict[str, Any]:
    response = await client.post("/api/v2/ingest", json={"source": source, "records": batch})
    assert response.status == 202, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def report(client: Client, source: str = "sensors", top: int = 10) -> dict[str, Any]:
    await client.app[DRIFT_MONITOR].drained()
    response = await client.get(f"/api/v2/quality/sources/{source}?top={top}")
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def test_reject_profile_rejects_out_of_range_records_with_feature_names(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
    kafka_broker: KafkaBroker, kafka_topic: str,
) -> None:
    write_profile(profiles_dir, "sensors", on_violation="reject")
    client = await app_client(
        quality_settings(kafka_bootstrap_servers=kafka_broker.bootstrap, kafka_topic=kafka_topic)
    )
    body = await ingest(client, out_of_range_batch())
    assert (body["records_accepted"], body["records_rejected"]) == (3, 2)
    assert [(e["index"], e["record_id"]) for e in body["errors"]] == [(1, "r-1"), (3, "r-3")]
    assert "f2" in body["errors"][0]["error"] and "f0, f6" in body["errors"][1]["error"]

    messages = await read_topic(kafka_broker.bootstrap, kafka_topic, expected=3)
    assert sorted(m.key for m in messages) == [b"r-0", b"r-2", b"r-4"]
    assert all("quality_flags" not in dict(m.headers) for m in messages)
    assert (await report(client))["records_rejected"] == 2


async def test_flag_profile_accepts_and_marks_records_in_a_kafka_header(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
    kafka_broker: KafkaBroker, kafka_topic: str,
) -> None:
    write_profile(profiles_dir, "sensors", on_violation="flag")
    client = await app_client(
        quality_settings(kafka_bootstrap_servers=kafka_broker.bootstrap, kafka_topic=kafka_topic)
    )
    body = await ingest(client, out_of_range_batch())
    assert (body["records_accepted"], body["records_rejected"], body["errors"]) == (5, 0, [])

    messages = await read_topic(kafka_broker.bootstrap, kafka_topic, expected=5)
    flags = {m.key: dict(m.headers).get("quality_flags") for m in messages}
    assert flags == {b"r-0": None, b"r-1": b"f2", b"r-2": None, b"r-3": b"f0,f6", b"r-4": None}
    assert (await report(client))["records_flagged"] == 2
    metrics = await (await client.get("/metrics")).text()
    assert 'mlgate_quality_violations_total{action="flagged",kind="source",name="sensors"} 2.0' in metrics


async def test_a_large_json_batch_parsed_into_one_matrix_is_screened_alike(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path
) -> None:
    write_profile(profiles_dir, "sensors", on_violation="reject")
    client = await app_client(quality_settings())
    batch = out_of_range_batch() + records(reference_sample(200, seed=8), "more")
    assert len(msgspec.json.encode({"source": "sensors", "records": batch})) >= PACKED_FROM_BYTES
    body = await ingest(client, batch)
    assert (body["records_accepted"], body["records_rejected"]) == (203, 2)
    assert [(e["index"], e["record_id"]) for e in body["errors"]] == [(1, "r-1"), (3, "r-3")]
    assert "f2" in body["errors"][0]["error"] and "f0, f6" in body["errors"][1]["error"]


async def test_sources_without_a_profile_are_not_screened(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
) -> None:
    write_profile(profiles_dir, "sensors")
    client = await app_client(quality_settings())
    body = await ingest(client, out_of_range_batch(), source="other")
    assert body["records_accepted"] == 5
    response = await client.get("/api/v2/quality/sources/other")
    assert response.status == 404


async def test_quality_endpoint_answers_the_top_drifting_features(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
) -> None:
    write_profile(profiles_dir, "sensors")
    client = await app_client(quality_settings())
    sample = reference_sample(WINDOW, seed=8)
    await ingest(client, records(sample, "a"))
    assert (await report(client))["features_over_threshold"] == 0
    await ingest(client, records(drifted(sample), "b"))

    body = await report(client, top=3)
    assert body["window"]["windows_completed"] == 2 and body["window"]["complete"]
    assert body["features_over_threshold"] == 3
    assert {feature["name"] for feature in body["top"]} == DRIFTED
    assert all(f["psi"] > body["psi_threshold"] and f["over_threshold"] for f in body["top"])
    assert len(body["top"][0]["recent"]) == len(body["top"][0]["edges"]) + 1

    metrics = await (await client.get("/metrics")).text()
    assert 'mlgate_feature_psi{feature="f1",kind="source",name="sensors"}' in metrics
    assert 'mlgate_feature_out_of_range_share{feature="f5",kind="source",name="sensors"}' in metrics


async def test_quality_endpoint_reads_model_profiles(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
) -> None:
    path = write_profile(profiles_dir, "demo", kind="model")
    assert path == profiles_dir / "models" / "demo" / "profile.json"
    client = await app_client(quality_settings(model_repository=str(profiles_dir / "models")))
    client.app[DRIFT_MONITOR].observe("demo", "model", reference_sample(WINDOW, seed=9))
    await client.app[DRIFT_MONITOR].drained()
    response = await client.get("/api/v2/quality/models/demo")
    assert response.status == 200
    body = await response.json()
    assert (body["kind"], body["records_observed"], body["window"]["complete"]) == ("model", WINDOW, True)


async def test_ingestion_goes_on_when_the_drift_mailbox_has_no_room(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
) -> None:
    write_profile(profiles_dir, "sensors")
    client = await app_client(quality_settings(drift_mailbox_size=10))
    started = time.perf_counter()
    for batch in range(5):
        body = await ingest(client, records(reference_sample(50, seed=batch), f"b{batch}"))
        assert body["records_accepted"] == 50
    assert time.perf_counter() - started < 5
    answer = await report(client)
    assert (answer["records_dropped"], answer["records_observed"]) == (250, 0)


async def test_quality_endpoint_needs_the_quality_or_admin_scope(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
    api_keys: KeyMaker,
) -> None:
    write_profile(profiles_dir, "sensors")
    quality, admin, ingest_only = (api_keys.create(scopes=s) for s in ("quality", "admin", "ingest"))
    client = await app_client(quality_settings(auth_disabled=False, keys_file=str(api_keys.path)))
    statuses = []
    for key in (quality, admin, ingest_only):
        response = await client.get("/api/v2/quality/sources/sensors", headers={"X-API-Key": key})
        statuses.append(response.status)
    assert statuses == [200, 200, 403]


async def test_quality_report_answers_msgpack_when_preferred(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
) -> None:
    write_profile(profiles_dir, "sensors")
    client = await app_client(quality_settings())
    response = await client.get(
        "/api/v2/quality/sources/sensors", headers={"Accept": "application/msgpack"}
    )
    assert response.status == 200
    assert msgspec.msgpack.decode(await response.read())["name"] == "sensors"


async def test_streamed_records_are_screened_with_their_stream_index(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
) -> None:
    write_profile(profiles_dir, "sensors")
    client = await app_client(quality_settings())
    lines = b"".join(msgspec.json.encode(record) + b"\n" for record in out_of_range_batch())
    response = await client.post(
        "/api/v2/ingest/stream?source=sensors", data=lines,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert response.status == 202
    body = await response.json()
    assert [(e["index"], e["record_id"]) for e in body["errors"]] == [(1, "r-1"), (3, "r-3")]


async def test_a_profile_written_while_serving_applies_after_a_reload(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
) -> None:
    client = await app_client(quality_settings())
    assert (await ingest(client, out_of_range_batch()))["records_rejected"] == 0
    write_profile(profiles_dir, "sensors")
    await client.app[RELOAD_HOOKS]["profiles"]()
    assert (await ingest(client, out_of_range_batch("again")))["records_rejected"] == 2


async def test_drift_sampling_counts_every_kth_row_but_checks_every_range(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
) -> None:
    write_profile(profiles_dir, "sensors", on_violation="reject")
    client = await app_client(quality_settings(drift_sample_every=4))
    await ingest(client, records(reference_sample(400, seed=9), "s"))
    body = await ingest(client, out_of_range_batch("o"))
    assert body["records_rejected"] == 2  # range checks saw rows the sample skipped
    assert (await report(client))["records_observed"] == 100 + 2  # 400/4, then 5 rows: 0 and 4
