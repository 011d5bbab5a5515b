"""/metrics parses with prometheus-client's parser and its counters move with traffic."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlgate.service import lifecycles
from mlgate.service.http.metrics import SizedFilesCollector
from mlgate.service.state import METRICS, MODEL_REPOSITORY, RECORD_DEDUP
from models.make_demo_model import build_mlp


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_request_counter_moves_with_traffic(app_client, make_settings) -> None:
    client = await app_client(make_settings(feature_dims=(4,)))
    for _ in range(3):
        await client.post("/api/v2/ingest", json={"source": "s", "records": [{"features": [1, 2, 3, 4]}]})
    samples = _samples(await (await client.get("/metrics")).text())
    key = (
        "mlgate_http_requests_total",
        (("method", "POST"), ("route", "/api/v2/ingest"), ("status", "202")),
    )
    assert samples[key] == 3.0


async def test_unmatched_paths_share_one_route_label(app_client, make_settings) -> None:
    client = await app_client(make_settings())
    await client.get("/no/such/path/1")
    await client.get("/no/such/path/2")
    samples = _samples(await (await client.get("/metrics")).text())
    key = ("mlgate_http_requests_total", (("method", "GET"), ("route", "unmatched"), ("status", "404")))
    assert samples[key] == 2.0


async def test_mailbox_depth_gauge_is_exposed(app_client, make_settings) -> None:
    client = await app_client(make_settings())
    samples = _samples(await (await client.get("/metrics")).text())
    assert samples[("mlgate_mailbox_depth", (("worker", "local_log"),))] == 0.0


async def test_a_failing_sampler_neither_breaks_the_scrape_nor_the_other_samplers(
    app_client, make_settings
) -> None:
    client = await app_client(make_settings())
    app_metrics = client.app[METRICS]

    def broken() -> None:
        raise FileNotFoundError("certificate renewed under us")

    app_metrics.samplers = {"broken": broken, **app_metrics.samplers}
    response = await client.get("/metrics")
    assert response.status == 200
    samples = _samples(await response.text())
    assert samples[("mlgate_mailbox_depth", (("worker", "local_log"),))] == 0.0


async def test_each_serving_model_version_has_mailbox_and_breaker_gauges(
    app_client, make_settings
) -> None:
    client = await app_client(make_settings())
    samples = _samples(await (await client.get("/metrics")).text())
    assert samples[("mlgate_mailbox_depth", (("worker", "inference:demo/1"),))] == 0.0
    assert samples[("mlgate_breaker_state", (("dependency", "model:demo/1"),))] == 0.0


def test_a_scrape_skips_a_process_file_created_but_not_yet_sized(tmp_path) -> None:
    # Another process counted 3 ...
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    counting = "from prometheus_client import Counter; Counter('done', 'd').inc(3)"
    subprocess.run([sys.executable, "-c", counting], env=env, check=True)
    # ... and a third is just creating its file (prometheus/client_python#1199).
    (tmp_path / "counter_999999.db").touch()
    samples = {
        sample.name: sample.value
        for family in SizedFilesCollector(str(tmp_path)).collect()
        for sample in family.samples
    }
    assert samples["done_total"] == 3.0


@pytest.mark.parametrize("multiprocess", [False, True], ids=["one process", "multiprocess"])
async def test_a_retired_versions_gauges_do_not_keep_their_last_value(
    app_client, make_settings, tmp_path, monkeypatch, multiprocess: bool
) -> None:
    """A review: in multiprocess mode prometheus-client cannot remove a label, so a
    retired version's open breaker stayed 2 for the life of the process (and a
    warning went to stderr, not a JSON line)."""
    if multiprocess:  # remove() would only warn: the gauges must be zeroed
        monkeypatch.setattr(lifecycles, "multiprocess_dir", lambda: str(tmp_path))
    root = tmp_path / "models"
    _add_demo_version(root, 1)
    client = await app_client(make_settings(model_repository=str(root)))
    repository = client.app[MODEL_REPOSITORY]
    client.app[METRICS].breaker_state.labels("model:demo/1").set(2)  # as if it opened
    _add_demo_version(root, 2)
    await repository.poll()  # version 2 serves, version 1 retires
    samples = _samples(await (await client.get("/metrics")).text())
    retired = samples.get(("mlgate_breaker_state", (("dependency", "model:demo/1"),)))
    assert retired == (0.0 if multiprocess else None)
    assert samples[("mlgate_breaker_state", (("dependency", "model:demo/2"),))] == 0.0


def _add_demo_version(root, version: int) -> None:
    staging = root / "demo" / f".staging-{version}"
    staging.mkdir(parents=True)
    (staging / "model.onnx").write_bytes(build_mlp(seed=version).SerializeToString())
    os.rename(staging, root / "demo" / str(version))


async def _redis_breaker_opened(app_client, make_settings, redis_server):
    """An app whose Redis breaker opened (Redis stopped, one call failed over), its
    time up after 0.1 s."""
    settings = make_settings(
        redis_url=f"redis://127.0.0.1:{redis_server.port}",
        redis_breaker_fail_max=1,
        redis_breaker_reset_s=0.1,
    )
    client = await app_client(settings)
    redis_server.stop()
    await client.app[RECORD_DEDUP].claim("t", ["a"])  # fails over: the breaker opens
    return client


async def test_the_redis_breaker_closes_after_redis_returns_on_a_quiet_host(
    app_client, make_settings, redis_server
) -> None:
    """A review: nothing but requests called Redis, so after it came back the breaker
    and its gauges stayed open until some request needed Redis."""
    client = await _redis_breaker_opened(app_client, make_settings, redis_server)
    down = _samples(await (await client.get("/metrics")).text())
    assert down[("mlgate_dependency_unavailable", (("dependency", "redis"),))] == 1.0
    redis_server.start()
    for _ in range(60):  # scrapes only: each may start the breaker's trial
        await asyncio.sleep(0.05)
        samples = _samples(await (await client.get("/metrics")).text())
        if samples[("mlgate_breaker_state", (("dependency", "redis"),))] == 0.0:
            break
    assert samples[("mlgate_breaker_state", (("dependency", "redis"),))] == 0.0
    assert samples[("mlgate_dependency_unavailable", (("dependency", "redis"),))] == 0.0


async def test_a_redis_trial_that_crashes_is_logged_and_counted(
    app_client, make_settings, redis_server, monkeypatch
) -> None:
    from mlgate.service.protection.shared_redis import SharedRedis

    client = await _redis_breaker_opened(app_client, make_settings, redis_server)

    async def broken_ping(self) -> bool:
        raise RuntimeError("a fault of ours")

    monkeypatch.setattr(SharedRedis, "ping", broken_ping)
    await asyncio.sleep(0.15)  # its time is up: the next sample tries it
    await client.get("/metrics")
    await asyncio.sleep(0.05)
    crashes = client.app[METRICS].background_task_crashes.labels("redis-trial")
    assert crashes._value.get() >= 1


async def test_a_server_without_tls_exports_no_certificate_expiry(app_client, make_settings) -> None:
    """A review: it read 0, and the README's expiry alert fired on every plain server."""
    client = await app_client(make_settings())
    text = await (await client.get("/metrics")).text()
    assert "mlgate_tls_certificate_expiry_seconds" not in text
