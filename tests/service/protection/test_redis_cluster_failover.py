"""A Redis Cluster master dies under a steady stream of rate-limited requests: no 5xx,
local buckets meanwhile (counted), and the shared limit again once its replica is
promoted."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from mlgate.config import Settings
from mlgate.service.state import METRICS, RECORD_DEDUP
from tests.redis_cluster import RedisClusterProcesses, start_redis_cluster
from tests.support import KeyMaker, stop_process

INGEST = {"source": "s", "records": [{"features": [1.0, 2.0, 3.0, 4.0]}]}
SLOW = 0.01  # tokens per second: no refill within a test


@pytest.fixture
def own_cluster() -> Iterator[RedisClusterProcesses]:
    """A cluster of this test's own: it kills one of its masters."""
    cluster = start_redis_cluster()
    yield cluster
    cluster.stop()


async def _post(client: Any, key: str) -> int:
    response = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": key})
    await response.read()
    return int(response.status)


async def test_a_master_failover_falls_back_to_local_buckets_then_shares_limits_again(
    app_client: Any,
    make_settings: Callable[..., Settings],
    api_keys: KeyMaker,
    own_cluster: RedisClusterProcesses,
    tmp_path: Any,
) -> None:
    def settings(name: str) -> Settings:
        return make_settings(
            auth_disabled=False, keys_file=str(api_keys.path), feature_dims=(4,),
            redis_url=own_cluster.seeds_url, redis_mode="cluster",
            redis_breaker_reset_s=0.2, data_dir=str(tmp_path / name),
            rate_limit_tenant_rate=100_000.0, rate_limit_tenant_burst=100_000,
        )

    streaming = api_keys.create(tenant="acme", rate=100_000, burst=100_000)
    limited = api_keys.create(tenant="acme", rate=SLOW, burst=2)
    client = await app_client(settings("one"))
    fallbacks = client.app[METRICS].rate_limit_fallback
    statuses: Counter[int] = Counter()
    stop = asyncio.Event()

    async def stream() -> None:
        while not stop.is_set():
            statuses[await _post(client, streaming)] += 1

    # Until the cluster decides a request (a first connection can time out on a busy
    # machine, and that request falls back): no fallback counted for it.
    for _ in range(50):
        before = fallbacks._value.get()
        assert await _post(client, streaming) == 202
        if fallbacks._value.get() == before:
            break
        await asyncio.sleep(0.1)
    streamer = asyncio.create_task(stream())
    try:
        assert await _post(client, streaming) == 202
        before_failover = fallbacks._value.get()
        # the master serving acme's buckets
        own_cluster.kill_master(own_cluster.master_index_of("mlgate:rl:t:{acme}:acme"))
        await asyncio.to_thread(own_cluster.wait_for_failover)
        # until a request is decided by the cluster again (no fallback counted for it)
        deadline = time.monotonic() + 20
        while True:
            before = fallbacks._value.get()
            await _post(client, streaming)
            if fallbacks._value.get() == before or time.monotonic() > deadline:
                break
    finally:
        stop.set()
        await streamer
    assert fallbacks._value.get() > before_failover  # local buckets while the master was gone
    assert statuses and all(status < 500 for status in statuses), statuses

    # shared again: a second process sees the tokens the first one took
    other = await app_client(settings("two"))
    assert [await _post(client, limited) for _ in range(2)] == [202, 202]
    assert await _post(other, limited) == 429
    assert other.app[METRICS].rate_limit_fallback._value.get() == 0


def _tenants_on_two_masters(cluster: RedisClusterProcesses) -> tuple[str, str]:
    """Two tenant names whose keys (hash-tagged by tenant) live on different masters."""
    first = "acme"
    master = cluster.master_index_of(f"mlgate:idem:{{{first}}}:x")
    other = next(
        name
        for name in (f"tenant-{i}" for i in range(100))
        if cluster.master_index_of(f"mlgate:idem:{{{name}}}:x") != master
    )
    return first, other


async def test_a_frozen_master_costs_only_the_tenants_whose_slots_it_serves(
    app_client: Any,
    make_settings: Callable[..., Settings],
    api_keys: KeyMaker,
    own_cluster: RedisClusterProcesses,
    tmp_path: Any,
) -> None:
    """A review: one breaker for the whole cluster, opened by one frozen master's
    timeouts, answered every tenant's Idempotency-Key requests 503."""
    frozen_tenant, served_tenant = _tenants_on_two_masters(own_cluster)
    settings = make_settings(
        auth_disabled=False, keys_file=str(api_keys.path), feature_dims=(4,),
        redis_url=own_cluster.seeds_url, redis_mode="cluster",
        redis_breaker_fail_max=1, redis_breaker_reset_s=0.3, data_dir=str(tmp_path / "one"),
    )
    frozen_key = api_keys.create(tenant=frozen_tenant)
    served_key = api_keys.create(tenant=served_tenant)
    client = await app_client(settings)

    async def degraded() -> dict[str, str]:
        return await _degraded(client)

    async def post(key: str, idempotency_key: str) -> int:
        headers = {"X-API-Key": key, "Idempotency-Key": idempotency_key}
        response = await client.post("/api/v2/ingest", json=INGEST, headers=headers)
        await response.read()
        return int(response.status)

    assert await post(frozen_key, "warm-1") == 202  # both known to the client, slots learnt
    assert await post(served_key, "warm-2") == 202
    node = own_cluster.masters()[own_cluster.master_index_of(f"mlgate:idem:{{{frozen_tenant}}}:x")]
    assert node.process is not None
    stop_process(node.process.pid)
    try:
        assert await post(frozen_key, "during-1") == 503  # its idempotency cannot be checked
        assert await post(served_key, "during-2") == 202
        assert "redis" in await degraded()  # the frozen master's calls fail
    finally:
        os.kill(node.process.pid, signal.SIGCONT)
    # Nothing calls that master on a quiet host: /ready's check pings it, as a trial of
    # its own breaker, and says so once it answers.
    for _ in range(100):  # 10 s
        if "redis" not in await degraded():
            break
        await asyncio.sleep(0.1)
    assert "redis" not in await degraded()


async def test_a_master_replaced_by_its_replica_is_logged_replaced_not_recovered(
    app_client: Any,
    make_settings: Callable[..., Settings],
    api_keys: KeyMaker,
    own_cluster: RedisClusterProcesses,
    tmp_path: Any,
) -> None:
    """A review read ``redis_recovered`` of a master still frozen: it had been let go
    of, its slots served by its promoted replica."""
    settings = make_settings(
        auth_disabled=False, keys_file=str(api_keys.path), feature_dims=(4,),
        redis_url=own_cluster.seeds_url, redis_mode="cluster",
        redis_breaker_fail_max=1, redis_breaker_reset_s=0.3, data_dir=str(tmp_path / "one"),
    )
    key = api_keys.create(tenant="acme")
    client = await app_client(settings)

    async def post(idempotency_key: str) -> int:
        headers = {"X-API-Key": key, "Idempotency-Key": idempotency_key}
        response = await client.post("/api/v2/ingest", json=INGEST, headers=headers)
        await response.read()
        return int(response.status)

    assert await post("warm") == 202
    dead = own_cluster.kill_master(own_cluster.master_index_of("mlgate:idem:{acme}:x"))
    breaker = f"redis {own_cluster.host}:{dead.port}"
    with capture_logs() as logs:
        assert await post("during") == 503  # its breaker opens
        await asyncio.to_thread(own_cluster.wait_for_failover)
        for _ in range(100):  # 10 s: /ready's check lets the dead master go
            if "redis" not in await _degraded(client):
                break
            await asyncio.sleep(0.1)
    assert "redis" not in await _degraded(client)
    said = [entry["event"] for entry in logs if entry.get("breaker") == breaker]
    assert "redis_master_replaced" in said
    assert "redis_recovered" not in said


async def _degraded(client: Any) -> dict[str, str]:
    response = await client.get("/ready")
    answer: dict[str, Any] = await response.json()
    return answer.get("degraded") or {}


async def test_dedup_ids_written_while_two_masters_failed_reach_the_first_back_at_once(
    app_client: Any,
    make_settings: Callable[..., Settings],
    own_cluster: RedisClusterProcesses,
    tmp_path: Any,
) -> None:
    """A review: the ids written while masters failed were sent to Redis only once every
    master answered again; one still frozen held back those of the masters back."""
    settings = make_settings(
        redis_url=own_cluster.seeds_url, redis_mode="cluster", redis_timeout_ms=200,
        redis_breaker_fail_max=1, redis_breaker_reset_s=0.2, data_dir=str(tmp_path / "one"),
    )
    client = await app_client(settings)
    dedup = client.app[RECORD_DEDUP]
    ids = [f"id-{i}" for i in range(64)]
    await dedup.confirm("t", await dedup.claim("t", ids))  # every master's slots known
    masters = own_cluster.masters()
    first_back, still_frozen = masters[0], masters[1]
    fresh = [f"new-{record_id}" for record_id in ids]
    index_of = {record_id: own_cluster.master_index_of(dedup._key("t", record_id)) for record_id in fresh}
    assert 0 in index_of.values() and 1 in index_of.values()
    assert first_back.process is not None and still_frozen.process is not None
    stop_process(first_back.process.pid)
    stop_process(still_frozen.process.pid)
    try:
        await dedup.confirm("t", await dedup.claim("t", fresh))  # two masters' ids kept here
        os.kill(first_back.process.pid, signal.SIGCONT)
        shared = dedup._redis
        back = f"redis 127.0.0.1:{first_back.port}"
        for _ in range(100):  # /ready pings the failing masters; the first answers
            await client.get("/ready")
            if back not in shared._failing:
                break
            await asyncio.sleep(0.05)
        # At once, while the other is still frozen (it fails over a second or more
        # later, which would let everything through). What a frozen master was sent
        # it runs once thawed, so Redis's keys tell nothing here: what is still kept
        # to send does.
        assert f"redis 127.0.0.1:{still_frozen.port}" in shared._failing
        on_frozen = {record_id for record_id in fresh if index_of[record_id] == 1}
        for _ in range(10):
            kept = {record_id for entry in dedup._unshared for record_id in entry[1]}
            if kept <= on_frozen:
                break
            await asyncio.sleep(0.05)
        assert kept <= on_frozen, sorted(kept - on_frozen)
    finally:
        os.kill(first_back.process.pid, signal.SIGCONT)
        os.kill(still_frozen.process.pid, signal.SIGCONT)
