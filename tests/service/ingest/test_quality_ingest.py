"""Semantic validation at ingest against a source profile, checked in Kafka; the
quality endpoint; the drift gauges."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from mlgate.config import Settings, worker_data_dir
from mlgate.service.http import metrics
from mlgate.service.ingest.validation import PACKED_FROM_BYTES
from mlgate.service.state import DRIFT_MONITOR, METRICS, RELOAD_HOOKS, SETTINGS
from mlgate.workers.quality.profile import build_profile
from mlgate.workers.quality.profile_store import ProfileStore
from mlgate.workers.sinks.local_log import read_log
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


async def test_a_record_rejected_by_the_profile_without_an_id_of_its_own_names_none(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
) -> None:
    """A review: the id generated for it, which nothing stored, was named, where a record
    refused by the schema names none: a client could not tell it from one it sent."""
    write_profile(profiles_dir, "sensors", on_violation="reject")
    client = await app_client(quality_settings())
    batch = out_of_range_batch()
    del batch[1]["record_id"]
    body = await ingest(client, batch)
    assert [(e["index"], e["record_id"]) for e in body["errors"]] == [(1, None), (3, "r-3")]


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


async def test_flags_stay_on_the_copy_flagged_when_a_batch_repeats_a_record_id(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
    kafka_broker: KafkaBroker, kafka_topic: str,
) -> None:
    """A review: flags were kept by record_id, so the clean first copy of an id (the
    one written) carried the flags of a later, dropped copy."""
    write_profile(profiles_dir, "sensors", on_violation="flag")
    client = await app_client(
        quality_settings(kafka_bootstrap_servers=kafka_broker.bootstrap, kafka_topic=kafka_topic)
    )
    clean = records(reference_sample(4, seed=7), "x")
    flagged_a = {**clean[0], "record_id": "a", "features": [1e6, *clean[0]["features"][1:]]}  # type: ignore[index]
    clean_a = {**clean[1], "record_id": "a"}
    clean_b = {**clean[2], "record_id": "b"}
    flagged_b = {**clean[3], "record_id": "b", "features": [*clean[3]["features"][:7], 1e6]}  # type: ignore[index]
    body = await ingest(client, [flagged_a, clean_a, clean_b, flagged_b])
    assert (body["records_accepted"], body["records_duplicate"]) == (2, 2)

    messages = await read_topic(kafka_broker.bootstrap, kafka_topic, expected=2)
    assert {m.key: dict(m.headers).get("quality_flags") for m in messages} == {b"a": b"f0", b"b": None}


async def test_flags_of_a_batch_sent_again_are_counted_once(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
) -> None:
    """A review: three sends of a batch of 2 flagged records (the resends written not
    at all, their records duplicates) counted 6 flagged records."""
    write_profile(profiles_dir, "sensors", on_violation="flag")
    client = await app_client(quality_settings())
    for _ in range(3):
        await ingest(client, out_of_range_batch())
    assert (await report(client))["records_flagged"] == 2
    metrics = await (await client.get("/metrics")).text()
    assert 'mlgate_quality_violations_total{action="flagged",kind="source",name="sensors"} 2.0' in metrics


async def test_a_batch_sent_again_is_observed_for_drift_once(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
) -> None:
    """A review: each resend of a batch the dedup dropped was observed again."""
    write_profile(profiles_dir, "sensors", on_violation="reject")
    client = await app_client(quality_settings())
    batch = records(reference_sample(5, seed=7), "r")
    await ingest(client, batch)
    for _ in range(2):
        body = await ingest(client, batch)
        assert (body["records_accepted"], body["records_duplicate"]) == (0, 5)
    assert (await report(client))["records_observed"] == 5


async def test_a_batch_whose_every_record_is_out_of_range_is_observed_for_drift(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
) -> None:
    """A review: a batch rejected whole (422) was never observed, so a source gone
    wholly out of range showed no drift, and one sent a record a request none ever."""
    write_profile(profiles_dir, "sensors", on_violation="reject")
    client = await app_client(quality_settings())
    batch = [out_of_range_batch()[1], out_of_range_batch()[3]]
    response = await client.post("/api/v2/ingest", json={"source": "sensors", "records": batch})
    assert response.status == 422
    answer = await report(client)
    assert answer["records_observed"] == 2
    shares = {entry["name"]: entry["out_of_range_share"] for entry in answer["top"]}
    assert shares["f2"] == shares["f0"] == 0.5


async def test_a_streamed_chunk_whose_every_record_is_out_of_range_is_observed_for_drift(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
) -> None:
    write_profile(profiles_dir, "sensors", on_violation="reject")
    client = await app_client(quality_settings())
    bad = [out_of_range_batch()[1], out_of_range_batch()[3]]
    lines = b"".join(msgspec.json.encode(record) + b"\n" for record in bad)
    response = await client.post(
        "/api/v2/ingest/stream?source=sensors", data=lines,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert response.status == 422, await response.text()
    assert (await report(client))["records_observed"] == 2


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
    for batch in range(5):
        body = await ingest(client, records(reference_sample(50, seed=batch), f"b{batch}"))
        assert body["records_accepted"] == 50
    answer = await report(client)
    # Each batch of 50 into a stream's half of a mailbox of 10 rows: every 10th row
    # observed, the rest dropped.
    assert (answer["records_dropped"], answer["records_observed"]) == (225, 25)


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


def stored_ids(client: Client) -> list[str]:
    log = Path(worker_data_dir(client.app[SETTINGS])) / "log"
    if not log.is_dir():
        return []
    return [msgspec.json.decode(entry.record.value)["record_id"] for entry in read_log(log)]


def metric(client: Client, name: str, labels: dict[str, str]) -> float | None:
    value: float | None = client.app[METRICS].registry.get_sample_value(name, labels)
    return value


async def test_a_source_whose_profile_cannot_be_read_is_refused_until_it_loads(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
) -> None:
    """A review: after a restart a broken profile file held nothing, so a reject
    check was off, /ready said 200 and no metric said so."""
    path = write_profile(profiles_dir, "sensors", on_violation="reject")
    good = path.read_bytes()
    path.write_text('{"kind": "source", "trunc')
    client = await app_client(quality_settings())
    response = await client.post(
        "/api/v2/ingest", json={"source": "sensors", "records": out_of_range_batch()}
    )
    assert response.status == 503
    assert int(response.headers["Retry-After"]) >= 1
    problem = await response.json()
    assert "sensors" in problem["detail"] and "profile cannot be read" in problem["detail"]
    assert stored_ids(client) == []
    assert (await ingest(client, out_of_range_batch("o"), source="other"))["records_accepted"] == 5
    assert metric(client, "mlgate_quality_profiles_unreadable", {"kind": "source"}) == 1.0
    assert metric(
        client, "mlgate_quality_profile_load_failures_total", {"kind": "source", "name": "sensors"}
    ) == 1.0

    path.write_bytes(good)
    await client.app[RELOAD_HOOKS]["profiles"]()
    assert (await ingest(client, out_of_range_batch("again")))["records_rejected"] == 2
    assert metric(client, "mlgate_quality_profiles_unreadable", {"kind": "source"}) == 0.0


async def test_a_streamed_source_whose_profile_cannot_be_read_is_refused(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
) -> None:
    write_profile(profiles_dir, "sensors").write_text("{")
    client = await app_client(quality_settings())
    lines = b"".join(msgspec.json.encode(record) + b"\n" for record in out_of_range_batch())
    response = await client.post(
        "/api/v2/ingest/stream?source=sensors", data=lines,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert response.status == 503 and "Retry-After" in response.headers
    assert stored_ids(client) == []


async def test_the_drift_report_of_a_source_whose_profile_cannot_be_read_is_503_not_404(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
) -> None:
    """A review: the report said "no profile named" (404) while every ingest of the
    source was refused for its unreadable profile (503)."""
    write_profile(profiles_dir, "sensors").write_text("{")
    client = await app_client(quality_settings())
    response = await client.get("/api/v2/quality/sources/sensors")
    assert response.status == 503 and "Retry-After" in response.headers
    assert "cannot be read" in (await response.json())["detail"]
    assert (await client.get("/api/v2/quality/sources/nobody")).status == 404


async def test_an_unreadable_model_profile_is_counted_but_not_enforced(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
) -> None:
    write_profile(profiles_dir, "demo", kind="model").write_text("{")
    client = await app_client(quality_settings(model_repository=str(profiles_dir / "models")))
    assert metric(client, "mlgate_quality_profiles_unreadable", {"kind": "model"}) == 1.0
    assert metric(client, "mlgate_quality_profiles_unreadable", {"kind": "source"}) == 0.0
    assert (await ingest(client, out_of_range_batch(), source="demo"))["records_accepted"] == 5


@pytest.mark.parametrize("multiprocess", [False, True], ids=["one process", "multiprocess"])
async def test_the_drift_gauges_of_a_removed_profile_go_with_it(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, multiprocess: bool,
) -> None:
    """A review: the PSI series of a removed profile kept their last value forever. In
    multiprocess mode prometheus-client cannot remove a series: they are zeroed."""
    if multiprocess:
        monkeypatch.setattr(metrics, "multiprocess_dir", lambda: str(tmp_path))
    path = write_profile(profiles_dir, "sensors")
    write_profile(profiles_dir, "pumps")
    client = await app_client(quality_settings())
    await ingest(client, records(drifted(reference_sample(WINDOW, seed=8)), "a"))
    await ingest(client, records(drifted(reference_sample(WINDOW, seed=8)), "b"), source="pumps")
    await client.app[DRIFT_MONITOR].drained()
    labels = {"kind": "source", "name": "sensors", "feature": "f1"}
    assert (metric(client, "mlgate_feature_psi", labels) or 0) > 0.2
    path.unlink()
    await client.app[RELOAD_HOOKS]["profiles"]()
    retired = None if not multiprocess else 0.0
    for gauge in ("mlgate_feature_psi", "mlgate_feature_out_of_range_share"):
        for feature in range(8):
            assert metric(client, gauge, {**labels, "feature": f"f{feature}"}) == retired
    assert (metric(client, "mlgate_feature_psi", {**labels, "name": "pumps"}) or 0) > 0.2


async def test_a_replaced_profile_keeps_only_the_drift_gauges_of_its_features(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
) -> None:
    path = write_profile(profiles_dir, "sensors")
    client = await app_client(quality_settings())
    await ingest(client, records(reference_sample(WINDOW, seed=8), "a"))
    await client.app[DRIFT_MONITOR].drained()
    labels = {"kind": "source", "name": "sensors", "feature": "f1"}
    assert metric(client, "mlgate_feature_psi", labels) is not None
    names = ["f0", "f1"] + [f"n{i}" for i in range(2, 8)]
    profile = build_profile(reference_sample(2000, seed=99), kind="source", name="sensors",
                            feature_names=names)
    assert ProfileStore(profiles_dir, profiles_dir / "models").save(profile) == path
    await client.app[RELOAD_HOOKS]["profiles"]()
    assert metric(client, "mlgate_feature_psi", labels) is not None  # still a feature
    assert metric(client, "mlgate_feature_psi", {**labels, "feature": "f2"}) is None
    assert metric(client, "mlgate_feature_out_of_range_share", {**labels, "feature": "f7"}) is None


async def test_drift_sampling_carries_its_phase_across_single_record_batches(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
) -> None:
    """A review: row 0 of every batch was taken, so single records were never sampled down."""
    write_profile(profiles_dir, "sensors")
    client = await app_client(quality_settings(drift_sample_every=4))
    for record in records(reference_sample(9, seed=9), "one"):
        await ingest(client, [record])
    assert (await report(client))["records_observed"] == 3  # rows 0, 4 and 8


async def test_drift_sampling_hands_the_monitor_a_copy_of_the_sampled_rows(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A review: ``matrix[::k]`` kept the whole batch alive while the mailbox counted a k-th."""
    write_profile(profiles_dir, "sensors")
    client = await app_client(quality_settings(drift_sample_every=4))
    monitor = client.app[DRIFT_MONITOR]
    observed: list[Any] = []
    real = monitor.observe

    def observe(name: str, kind: Any, matrix: Any) -> bool:
        observed.append(matrix)
        return real(name, kind, matrix)

    monkeypatch.setattr(monitor, "observe", observe)
    await ingest(client, records(reference_sample(400, seed=9), "s"))
    [matrix] = observed
    assert matrix.shape == (100, 8) and matrix.base is None


async def test_the_records_help_names_only_outcomes_that_are_counted(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
) -> None:
    """A review: the help listed ``rejected``, never emitted (profile rejections count
    in mlgate_quality_violations_total, each record's reason in the 202's errors)."""
    write_profile(profiles_dir, "sensors")
    client = await app_client(quality_settings())
    assert (await ingest(client, out_of_range_batch()))["records_rejected"] == 2
    text = await (await client.get("/metrics")).text()
    [help_line] = [line for line in text.splitlines() if line.startswith("# HELP mlgate_records_total ")]
    outcomes = {s.split('"')[1] for s in text.splitlines() if s.startswith("mlgate_records_total{")}
    assert "rejected" not in help_line and "rejected" not in outcomes


async def test_ingest_stays_checked_while_the_sources_directory_cannot_be_listed(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A review: a sources directory that could not be listed dropped every source
    profile, and ingest ran unchecked with nothing but info lines."""
    write_profile(profiles_dir, "sensors", on_violation="reject")
    client = await app_client(quality_settings())
    sources, scandir = str(profiles_dir / "sources"), os.scandir

    def refusing(path: Any = ".") -> Any:
        if os.fspath(path) == sources:
            raise PermissionError(13, "Permission denied", sources)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    await client.app[RELOAD_HOOKS]["profiles"]()
    assert (await ingest(client, out_of_range_batch()))["records_rejected"] == 2
    assert metric(client, "mlgate_quality_profiles_unreadable", {"kind": "source"}) == 1.0


async def test_a_fresh_app_whose_sources_directory_cannot_be_listed_refuses_ingest_until_it_can(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A review: a process started while ``sources/`` could not be listed (a symlink
    loop, its permissions) knew of no profile and let out-of-range records through a
    ``reject`` profile."""
    write_profile(profiles_dir, "sensors", on_violation="reject")
    sources, scandir = str(profiles_dir / "sources"), os.scandir

    def refusing(path: Any = ".") -> Any:
        if os.fspath(path) == sources:
            raise PermissionError(13, "Permission denied", sources)
        return scandir(path)

    with monkeypatch.context() as patch:
        patch.setattr(os, "scandir", refusing)
        client = await app_client(quality_settings())
        response = await client.post(
            "/api/v2/ingest", json={"source": "sensors", "records": out_of_range_batch()}
        )
        assert response.status == 503, await response.text()
        assert "Retry-After" in response.headers
        assert metric(client, "mlgate_quality_profiles_unreadable", {"kind": "source"}) == 1.0
    await client.app[RELOAD_HOOKS]["profiles"]()
    assert (await ingest(client, out_of_range_batch()))["records_rejected"] == 2


@pytest.mark.parametrize(
    "query",
    ["top=abc", "top=", "top=-1", "top=101", "top=%2B3", "top=%203", "top=1_0", "top=%EF%BC%95", "top=3&top=4"],
    ids=["text", "empty", "negative", "too-many", "plus", "blank", "underscore", "full-width", "twice"],
)
async def test_top_is_refused_unless_one_integer_in_ascii_digits(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
    query: str,
) -> None:
    """A review: Python's int() read "+3", " 3", "1_0" and a full-width 5, and a second
    ``top`` was ignored, where the document says one integer."""
    write_profile(profiles_dir, "sensors")
    client = await app_client(quality_settings())
    response = await client.get(f"/api/v2/quality/sources/sensors?{query}")
    assert response.status == 422
    assert [error["loc"] for error in (await response.json())["errors"]] == ["query.top"]


@pytest.mark.parametrize("top", ["0", "100", "007"])
async def test_top_in_range_is_taken(
    app_client: AppClientFactory, quality_settings: Callable[..., Settings], profiles_dir: Path,
    top: str,
) -> None:
    write_profile(profiles_dir, "sensors")
    client = await app_client(quality_settings())
    response = await client.get(f"/api/v2/quality/sources/sensors?top={top}")
    assert response.status == 200
