"""Shared state on a Redis Cluster: calls that would span slots are split per slot and
answered by the cluster itself, never by the local fallback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from mlgate.config import Settings
from mlgate.service.ingest.dedup import RecordDeduplicator
from mlgate.service.protection.idempotency import Entry, IdempotencyStore
from mlgate.service.protection.rate_limits import CoalescedTakes
from mlgate.service.protection.shared_redis import SharedRedis
from tests.redis_cluster import RedisClusterProcesses


@pytest.fixture
def cluster_settings(
    redis_cluster: RedisClusterProcesses, make_settings: Callable[..., Settings]
) -> Settings:
    redis_cluster.flush()
    # These tests are about what the Cluster answers; a connect on the loaded CI
    # machine may take past the 200 ms default.
    return make_settings(
        redis_url=redis_cluster.seeds_url, redis_mode="cluster", redis_timeout_ms=5000
    )


@pytest.fixture
async def fallbacks() -> list[str]:
    return []


@pytest.fixture
async def shared(cluster_settings: Settings, fallbacks: list[str]) -> AsyncIterator[SharedRedis]:
    redis = SharedRedis.from_settings(cluster_settings, on_fallback=fallbacks.append)
    yield redis
    await redis.close()


def _buckets(redis: SharedRedis, tenant: str) -> tuple[str, str]:
    tag = redis.hash_tag(tenant)
    return f"mlgate:rl:k:{tag}key-{tenant}", f"mlgate:rl:t:{tag}{tenant}"


async def test_takes_of_many_tenants_sent_together_are_each_answered_by_the_cluster(
    shared: SharedRedis, fallbacks: list[str]
) -> None:
    takes = CoalescedTakes(shared)
    tenants = [f"tenant{i}" for i in range(30)]  # their slots are on every master
    assert len(shared.by_slot(tenants, lambda tenant: _buckets(shared, tenant)[0])) == 30
    try:
        # burst 2: the third take of each tenant is refused, the cluster keeps count
        answers = await asyncio.gather(
            *(takes.take(_buckets(shared, t), (0.01, 2, 0.01, 2)) for _ in range(3) for t in tenants)
        )
    finally:
        await takes.close()
    assert [allowed for allowed, _, _ in answers] == [True] * 60 + [False] * 30
    assert fallbacks == []


async def test_record_ids_spread_over_slots_are_duplicates_for_another_process(
    cluster_settings: Settings, shared: SharedRedis, fallbacks: list[str]
) -> None:
    ids = [f"r{i}" for i in range(40)]
    one, two = RecordDeduplicator(cluster_settings, shared), RecordDeduplicator(cluster_settings, shared)
    claim = await one.claim("acme", ids)
    assert all(claim.new)
    await one.confirm("acme", claim)
    assert not any((await two.claim("acme", [*ids, "r0"])).new)
    assert (await two.claim("acme", ["fresh"])).new == [True]
    assert fallbacks == []


async def test_idempotency_claims_of_many_tenants_are_extended_per_slot(
    cluster_settings: Settings, shared: SharedRedis, fallbacks: list[str]
) -> None:
    store = IdempotencyStore(cluster_settings, shared)
    claims: list[Any] = [await store.claim(f"tenant{i}", "key", "fp") for i in range(10)]
    await store._extend_claims(claims)
    assert fallbacks == []
    # still held in the cluster: another process's claim sees the first one in flight
    other = IdempotencyStore(cluster_settings, shared)
    found = [await other.claim(f"tenant{i}", "key", "fp") for i in range(10)]
    assert all(isinstance(entry, Entry) and entry.response is None for entry in found)
    await store.drain(1)
