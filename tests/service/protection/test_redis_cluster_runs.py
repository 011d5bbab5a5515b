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


def _tenants_by_master(cluster: RedisClusterProcesses) -> list[str]:
    """A tenant whose idempotency records each master holds, in master order."""
    found: dict[int, str] = {}
    for n in range(500):
        tenant = f"tenant-{n}"
        found.setdefault(cluster.master_index_of(f"mlgate:idem:{{{tenant}}}x"), tenant)
        if len(found) == len(cluster.masters()):
            break
    return [found[index] for index in sorted(found)]


async def test_cluster_masters_restarted_empty_are_each_logged_and_counted(
    app_client,
    secured,
    api_keys: KeyMaker,
    cluster_without_replicas: RedisClusterProcesses,
) -> None:
    """A review: a master without a replica restarted empty, keyed ingests answered
    before it ran again and wrote their records twice, and nothing was said; then,
    with the masters restarting together, one was named twice and another never."""
    tenants = _tenants_by_master(cluster_without_replicas)
    keys = [api_keys.create(tenant=tenant, scopes="ingest") for tenant in tenants]
    client = await app_client(
        secured(
            redis_url=cluster_without_replicas.seeds_url, redis_mode="cluster", redis_timeout_ms=5000
        )
    )
    for key in keys:
        await _ingest_until_answered(client, key, "before")
    masters = cluster_without_replicas.masters()
    for master in masters:
        master.stop()
    for master in masters:
        master.start()
    cluster_without_replicas.wait_for_failover()
    with capture_logs() as logs:
        for key in keys:
            await _ingest_until_answered(client, key, "after")
        await ready_once(client, lambda body: len(_events(logs, "redis_restarted")) == len(masters))
    restarted = _events(logs, "redis_restarted")
    assert sorted(entry["master"] for entry in restarted) == sorted(
        f"127.0.0.1:{master.port}" for master in masters
    )
    assert len({entry["run_id"] for entry in restarted}) == len(masters)
    assert all(entry["persistent"] is False for entry in restarted)
    assert client.app[METRICS].registry.get_sample_value("mlgate_redis_restarts_total") == len(
        masters
    )


@pytest.fixture
def cluster_with_replicas() -> Iterator[RedisClusterProcesses]:
    """A cluster of this test's own: it fails a master over and back."""
    cluster = start_redis_cluster()
    yield cluster
    cluster.stop()


async def test_a_master_failed_over_and_back_is_no_restart(
    app_client, secured, api_keys: KeyMaker, cluster_with_replicas: RedisClusterProcesses
) -> None:
    """A review: a master killed, its replica promoted, the old master back as its
    replica and failed back (with the replica's data) was logged ``redis_restarted``,
    lost everything."""
    tenant = _tenants_by_master(cluster_with_replicas)[0]
    key = api_keys.create(tenant=tenant, scopes="ingest")
    client = await app_client(
        secured(redis_url=cluster_with_replicas.seeds_url, redis_mode="cluster", redis_timeout_ms=5000)
    )
    with capture_logs() as logs:
        await _ingest_until_answered(client, key, "before")
        old = cluster_with_replicas.kill_master(0)
        cluster_with_replicas.wait_for_failover()
        await _ingest_until_answered(client, key, "promoted")
        cluster_with_replicas.killed.remove(old)
        old.start()  # back empty, as the replica of the one promoted
        for _ in range(300):
            with redis.Redis(port=old.port) as node:
                if node.info("replication").get("master_link_status") == "up":
                    node.execute_command("CLUSTER", "FAILOVER")
                    break
            await asyncio.sleep(0.1)
        for _ in range(300):
            if old in cluster_with_replicas.masters():
                break
            await asyncio.sleep(0.1)
        assert old in cluster_with_replicas.masters()
        cluster_with_replicas.wait_for_failover()
        await _ingest_until_answered(client, key, "failed-back")
    assert not _events(logs, "redis_restarted")
    assert client.app[METRICS].registry.get_sample_value("mlgate_redis_restarts_total") == 0.0


async def test_a_masters_own_persistence_is_read_apart_from_the_others(
    cluster_url: str, redis_cluster: RedisClusterProcesses, make_settings: Callable[..., Settings]
) -> None:
    """A review: a master restarted from its own append-only file was said to have lost
    everything, as another master kept nothing."""
    master = redis_cluster.masters()[0]
    shared = SharedRedis.from_settings(
        make_settings(redis_url=cluster_url, redis_mode="cluster", redis_timeout_ms=5000)
    )
    with redis.Redis(port=master.port) as operator:
        operator.config_set("appendonly", "yes")
        try:
            await shared.check_mode()
            assert await shared.persistent(f"127.0.0.1:{master.port}") is True
            assert await shared.persistent() is False
        finally:
            operator.config_set("appendonly", "no")
            await shared.close()


async def test_a_master_evicting_any_key_is_named_though_another_evicts_expiring_ones(
    app_client, secured, cluster_url: str, redis_cluster: RedisClusterProcesses
) -> None:
    first, second = redis_cluster.masters()[:2]
    with redis.Redis(port=first.port) as volatile, redis.Redis(port=second.port) as allkeys:
        volatile.config_set("maxmemory-policy", "volatile-lru")
        allkeys.config_set("maxmemory-policy", "allkeys-lru")
        try:
            with capture_logs() as logs:
                await app_client(
                    secured(redis_url=cluster_url, redis_mode="cluster", redis_timeout_ms=5000)
                )
        finally:
            volatile.config_set("maxmemory-policy", "noeviction")
            allkeys.config_set("maxmemory-policy", "noeviction")
    assert [entry["maxmemory_policy"] for entry in _events(logs, "redis_evicts_any_key")] == [
        "allkeys-lru"
    ]


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


async def test_a_cluster_call_that_swallows_its_cancellation_still_ends_at_its_bound(
    cluster_url: str, make_settings: Callable[..., Settings]
) -> None:
    """A review: redis-py's ``wait_for`` around a send swallowed a cancellation landing
    as the send ended (Python 3.11), and the call ran on past its bound (1.6 s against
    0.4). A call that will not be cancelled is given up on all the same."""
    shared = SharedRedis.from_settings(
        make_settings(redis_url=cluster_url, redis_mode="cluster", redis_timeout_ms=300)
    )
    finished = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            await asyncio.sleep(1.5)  # cancelled, and going on all the same
        finished.set()

    try:
        await shared.check_mode()
        with pytest.raises(RedisUnavailable):
            await shared.call("bounded", stubborn, key="{bound}k")
        assert not finished.is_set()
    finally:
        await shared.close()
