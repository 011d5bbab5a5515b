"""Redis that answers reads but refuses writes (out of memory under ``noeviction``) is
down for mlgate until a write succeeds: /ready and the gauges say so the whole time.
A Redis that would forget everything at a restart is named at start, and a restart
while serving is logged and counted."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from mlgate.service.state import METRICS
from tests.service.protection.conftest import ready_once
from tests.support import KeyMaker, ManagedProcess

INGEST = {"source": "s", "records": [{"features": [1.0, 2.0, 3.0, 4.0]}]}


@pytest.fixture
async def operator(redis_server: ManagedProcess) -> AsyncIterator[aioredis.Redis]:
    """A connection of the operator's, to fill Redis's memory and free it."""
    connection = aioredis.Redis(port=redis_server.port)
    await connection.config_set("maxmemory-policy", "noeviction")
    yield connection
    await connection.config_set("maxmemory", 0)
    await connection.config_set("min-replicas-to-write", 0)
    await connection.aclose()


async def _ready_bodies(client: Any, polls: int) -> list[dict[str, Any]]:
    bodies = []
    for _ in range(polls):
        bodies.append(await (await client.get("/ready")).json())
        await client.get("/health")  # a turn for the trial ping /ready started
    return bodies


@pytest.mark.parametrize("refusal", [("maxmemory", 1), ("min-replicas-to-write", 1)])
async def test_redis_refusing_writes_stays_degraded_while_its_reads_answer(
    app_client, secured, api_keys: KeyMaker, redis_server: ManagedProcess, operator: aioredis.Redis,
    refusal: tuple[str, int],
) -> None:
    """A review: each read Redis answered (the trial ping, a key lookup) ended the
    outage, so /ready said ready and the gauges 0 while every Idempotency-Key was
    refused and the rate limits and dedup ran per process; the log said
    unavailable/recovered 300 times a minute."""
    key = api_keys.create(scopes="ingest")
    client = await app_client(secured(redis_url=f"redis://127.0.0.1:{redis_server.port}"))
    await operator.config_set(*refusal)  # out of memory; too few replicas (NOREPLICAS)
    with capture_logs() as logs:
        response = await client.post(
            "/api/v2/ingest", json=INGEST, headers={"X-API-Key": key, "Idempotency-Key": "full-1"}
        )
        assert response.status == 503
        bodies = await _ready_bodies(client, 20)
    assert all("Redis" in body.get("degraded", {}).get("redis", "") for body in bodies), bodies
    unavailable = client.app[METRICS].registry.get_sample_value(
        "mlgate_dependency_unavailable", {"dependency": "redis"}
    )
    assert unavailable == 1.0
    events = [entry["event"] for entry in logs if entry["event"].startswith("redis_")]
    assert events == ["redis_unavailable"]
    assert [entry["writes_refused"] for entry in logs if entry["event"] == "redis_unavailable"] == [True]


async def test_redis_taking_writes_again_is_ready_again(
    app_client, secured, api_keys: KeyMaker, redis_server: ManagedProcess, operator: aioredis.Redis
) -> None:
    key = api_keys.create(scopes="ingest")
    client = await app_client(secured(redis_url=f"redis://127.0.0.1:{redis_server.port}"))
    await operator.config_set("maxmemory", 1)
    refused = await client.post(
        "/api/v2/ingest", json=INGEST, headers={"X-API-Key": key, "Idempotency-Key": "full-2"}
    )
    assert refused.status == 503
    await operator.config_set("maxmemory", 0)
    body = await ready_once(client, lambda body: "degraded" not in body)
    assert "degraded" not in body, body
    answered = await client.post(
        "/api/v2/ingest", json=INGEST, headers={"X-API-Key": key, "Idempotency-Key": "full-2"}
    )
    assert answered.status == 202


async def test_a_redis_that_forgets_everything_at_restart_is_named_at_start(
    app_client, secured, redis_server: ManagedProcess
) -> None:
    """A review: Redis restarted empty, and retries with an Idempotency-Key ran again
    and records were written twice, with nothing said anywhere."""
    with capture_logs() as logs:
        await app_client(secured(redis_url=f"redis://127.0.0.1:{redis_server.port}"))
    assert [entry["event"] for entry in logs if entry["event"] == "redis_not_persistent"] == [
        "redis_not_persistent"
    ]


async def test_a_persistent_redis_is_not_warned_of(
    app_client, secured, redis_server: ManagedProcess, operator: aioredis.Redis
) -> None:
    await operator.config_set("save", "3600 1")
    try:
        with capture_logs() as logs:
            await app_client(secured(redis_url=f"redis://127.0.0.1:{redis_server.port}"))
    finally:
        await operator.config_set("save", "")  # no dump.rdb left where the tests run
    assert not [entry for entry in logs if entry["event"] == "redis_not_persistent"]


async def _ingest_until_recovered(client: Any, key: str) -> None:
    """Ingests with an Idempotency-Key (each a Redis call) until one is answered 202:
    the first after a restart fails on the dead connection, a later one reconnects."""
    for attempt in range(50):
        response = await client.post(
            "/api/v2/ingest", json=INGEST, headers={"X-API-Key": key, "Idempotency-Key": f"after-{attempt}"}
        )
        if response.status == 202:
            return
        await ready_once(client, lambda body: "degraded" not in body)


async def test_redis_restarted_while_serving_is_logged_and_counted(
    app_client, secured, api_keys: KeyMaker, redis_server: ManagedProcess
) -> None:
    """A review: Redis restarted empty while mlgate ran (every idempotency answer and
    dedup id gone), and only ``redis_unavailable`` and ``redis_recovered`` were said."""
    key = api_keys.create(scopes="ingest")
    client = await app_client(secured(redis_url=f"redis://127.0.0.1:{redis_server.port}"))
    await _ingest_until_recovered(client, key)
    redis_server.stop()
    redis_server.start()
    with capture_logs() as logs:
        await _ingest_until_recovered(client, key)
        await ready_once(client, lambda body: any(entry["event"] == "redis_restarted" for entry in logs))
    restarted = [entry for entry in logs if entry["event"] == "redis_restarted"]
    assert len(restarted) == 1 and restarted[0]["persistent"] is False
    assert "idempotency answers" in restarted[0]["lost"]
    assert client.app[METRICS].registry.get_sample_value("mlgate_redis_restarts_total") == 1.0


async def test_redis_back_after_an_outage_without_a_restart_is_no_restart(
    app_client, secured, api_keys: KeyMaker, redis_server: ManagedProcess
) -> None:
    key = api_keys.create(scopes="ingest")
    client = await app_client(secured(redis_url=f"redis://127.0.0.1:{redis_server.port}"))
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)  # frozen: calls time out, then answer again
    try:
        frozen = await client.post(
            "/api/v2/ingest", json=INGEST, headers={"X-API-Key": key, "Idempotency-Key": "frozen"}
        )
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert frozen.status == 503
    with capture_logs() as logs:
        await _ingest_until_recovered(client, key)
    assert "redis_recovered" in [entry["event"] for entry in logs]
    assert not [entry for entry in logs if entry["event"] == "redis_restarted"]
    assert client.app[METRICS].registry.get_sample_value("mlgate_redis_restarts_total") == 0.0


@pytest.mark.parametrize(
    ("policy", "event"),
    [
        ("allkeys-lru", "redis_evicts_any_key"),
        ("volatile-lru", "redis_evicts_expiring_keys"),
        ("volatile-ttl", "redis_evicts_expiring_keys"),
        ("noeviction", None),
    ],
)
async def test_a_redis_that_evicts_when_full_is_named_at_start(
    app_client, secured, redis_server: ManagedProcess, operator: aioredis.Redis, policy: str, event: str | None
) -> None:
    """A review: under ``allkeys-lru`` one tenant's flood of record ids evicted the keys
    stored in Redis, and every tenant was answered 401; nothing had said the policy
    could. Another: under ``volatile-ttl`` the rate-limit buckets went first, and
    limits stopped holding, where our warning had advised ``volatile-*``."""
    await operator.config_set("maxmemory-policy", policy)
    with capture_logs() as logs:
        await app_client(secured(redis_url=f"redis://127.0.0.1:{redis_server.port}"))
    warned = [entry for entry in logs if entry["event"].startswith("redis_evicts_")]
    assert [(entry["event"], entry["maxmemory_policy"]) for entry in warned] == (
        [(event, policy)] if event else []
    )
    assert all("noeviction" in entry["fix"] and "volatile" not in entry["fix"] for entry in warned)
