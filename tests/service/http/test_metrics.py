"""/metrics parses with prometheus-client's parser and its counters move with traffic."""

from __future__ import annotations

import os
import subprocess
import sys

from prometheus_client.parser import text_string_to_metric_families

from mlgate.service.http.metrics import SizedFilesCollector
from mlgate.service.state import METRICS


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
