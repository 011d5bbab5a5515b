"""What mlgate says of a Redis Cluster's masters: their configuration checked at start
(each master's, as for a single Redis), a master restarted empty logged and counted,
and a whole call bounded whatever redis-py retries on the way (a review: none of the
three held in cluster mode)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from mlgate.config import Settings
from mlgate.service.protection.shared_redis import RedisUnavailable, SharedRedis
from mlgate.service.state import METRICS
from tests.redis_cluster import RedisClusterProcesses, start_redis_cluster
from tests.service.protection.conftest import ready_once
from tests.support import KeyMaker

INGEST = {"source": "s", "records": [{"features": [1.0, 2.0, 3.0, 4.0]}]}


@pytest.fixture
def cluster_url(redis_cluster: RedisClusterProcesses) -> str:
    redis_cluster.flush()
    return redis_cluster.seeds_url


def _events(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == event]


async def test_a_cluster_whose_masters_keep_nothing_is_named_at_start(
    app_client, secured, cluster_url: str
) -> None:
    with capture_logs() as logs:
        await app_client(secured(redis_url=cluster_url, redis_mode="cluster", redis_timeout_ms=5000))
    assert len(_events(logs, "redis_not_persistent")) == 1


async def test_a_cluster_master_that_evicts_any_key_is_named_at_start(
    app_client, secured, cluster_url: str, redis_cluster: RedisClusterProcesses
) -> None:
    master = redis_cluster.masters()[1]
    with redis.Redis(port=master.port) as operator:
        operator.config_set("maxmemory-policy", "allkeys-lru")
        try:
            with capture_logs() as logs:
                await app_client(
                    secured(redis_url=cluster_url, redis_mode="cluster", redis_timeout_ms=5000)
                )
        finally:
            operator.config_set("maxmemory-policy", "noeviction")
    evicting = _events(logs, "redis_evicts_any_key")
    assert len(evicting) == 1 and evicting[0]["maxmemory_policy"] == "allkeys-lru"


async def test_a_cluster_whose_masters_all_persist_is_not_warned_of(
    app_client, secured, cluster_url: str, redis_cluster: RedisClusterProcesses
) -> None:
    masters = redis_cluster.masters()
    try:
        for master in masters:
            with redis.Redis(port=master.port) as operator:
                operator.config_set("appendonly", "yes")
        with capture_logs() as logs:
            await app_client(secured(redis_url=cluster_url, redis_mode="cluster", redis_timeout_ms=5000))
    finally:
        for master in masters:
            with redis.Redis(port=master.port) as operator:
                operator.config_set("appendonly", "no")
    assert not _events(logs, "redis_not_persistent")


@pytest.fixture
def cluster_without_replicas() -> Iterator[RedisClusterProcesses]:
    """A cluster of this test's own, a master each slot and no replica: a master that
    restarts comes back with its slots and none of its keys."""
    cluster = start_redis_cluster(replicas=0)
    yield cluster
    cluster.stop()


async def _ingest_until_answered(client: Any, key: str, tag: str) -> None:
    for attempt in range(100):
        response = await client.post(
            "/api/v2/ingest",
            json=INGEST,
            headers={"X-API-Key": key, "Idempotency-Key": f"{tag}-{attempt}"},
        )
        if response.status == 202:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("no keyed ingest answered 202")


async def test_a_cluster_master_restarted_empty_is_logged_and_counted(
    app_client,
    secured,
    api_keys: KeyMaker,
    cluster_without_replicas: RedisClusterProcesses,
    make_settings: Callable[..., Settings],
) -> None:
    """A review: a master without a replica restarted empty, keyed ingests answered
    before it ran again and wrote their records twice, and nothing was said."""
    key = api_keys.create(tenant="restarted", scopes="ingest")
    client = await app_client(
        secured(
            redis_url=cluster_without_replicas.seeds_url, redis_mode="cluster", redis_timeout_ms=5000
        )
    )
    await _ingest_until_answered(client, key, "before")
    # The master holding the tenant's idempotency records.
    shared = SharedRedis.from_settings(
        make_settings(
            redis_url=cluster_without_replicas.seeds_url, redis_mode="cluster", redis_timeout_ms=5000
        )
    )
    try:
        await shared.check_mode()
        tagged = f"mlgate:idem:{shared.hash_tag('restarted')}x"
        index = cluster_without_replicas.master_index_of(tagged)
    finally:
        await shared.close()
    master = cluster_without_replicas.masters()[index]
    master.stop()
    master.start()
    cluster_without_replicas.wait_for_failover()
    with capture_logs() as logs:
        await _ingest_until_answered(client, key, "after")
        await ready_once(client, lambda body: bool(_events(logs, "redis_restarted")))
    restarted = _events(logs, "redis_restarted")
    assert len(restarted) == 1
    assert restarted[0]["master"] == f"127.0.0.1:{master.port}"
    assert restarted[0]["persistent"] is False
    assert client.app[METRICS].registry.get_sample_value("mlgate_redis_restarts_total") == 1.0


async def test_a_cluster_call_ends_at_its_bound_whatever_redis_py_waits_on_the_way(
    cluster_url: str, make_settings: Callable[..., Settings]
) -> None:
    """A review: redis-py's own waits between tries (``CLUSTERDOWN``, ``TRYAGAIN``,
    redirects) took calls to 0.85 and 1.15 s against a 200 ms timeout. A call that
    keeps waiting, as redis-py's tries do, is given up at its bound."""
    shared = SharedRedis.from_settings(
        make_settings(redis_url=cluster_url, redis_mode="cluster", redis_timeout_ms=300)
    )
    steps: list[int] = []

    async def tries() -> None:
        for step in range(20):
            await shared.client.get("{bound}k")
            steps.append(step)
            await asyncio.sleep(0.25)  # as redis-py sleeps between CLUSTERDOWN tries

    try:
        await shared.check_mode()
        with pytest.raises(RedisUnavailable):
            await shared.call("bounded", tries, key="{bound}k")
    finally:
        await shared.close()
    assert 0 < len(steps) < 20
