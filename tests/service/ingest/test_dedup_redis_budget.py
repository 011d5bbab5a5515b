"""A tenant's record_ids in Redis are bounded (MLGATE_DEDUP_REDIS_TENANT_MAX_IDS): one
tenant flooding fresh ids cannot fill the Redis every tenant shares; past its budget
its new ids are kept in process, and dedup still holds for them."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from mlgate.service.ingest.dedup import Claim, RecordDeduplicator
from mlgate.service.state import METRICS, RECORD_DEDUP, RECORD_SINK
from tests.support import KeyMaker

PATH = "/api/v2/ingest"
BUDGET = 80  # on a Cluster, 10 per slot of the tenant's 8
# Each test runs against a fresh redis-server and the session's Redis Cluster; those
# counting to the budget exactly against the redis-server only (a Cluster splits it in 8).
EVERY_REDIS = pytest.mark.parametrize("backend", ["redis", "cluster"], indirect=True)
STANDALONE = pytest.mark.parametrize("backend", ["redis"], indirect=True)


@pytest.fixture
async def budgeted(app_client: Any, settings_for: Any, backend: str) -> RecordDeduplicator:
    """The dedup of an app on ``backend``, each tenant's ids in Redis bounded by BUDGET."""
    client = await app_client(settings_for(backend, dedup_redis_tenant_max_ids=BUDGET))
    dedup: RecordDeduplicator = client.app[RECORD_DEDUP]
    return dedup


async def _ids_in_redis(url: str, tenant: str) -> int:
    """How many of ``tenant``'s record_ids Redis holds (every master of a Cluster)."""
    first = url.split(",")[0]
    client = (
        RedisCluster.from_url(first)
        if "," in url or await _is_cluster(first)
        else aioredis.Redis.from_url(first)
    )
    try:
        return len([key async for key in client.scan_iter(match=f"mlgate:rid:*{tenant}*")])
    finally:
        await client.aclose()


async def _is_cluster(url: str) -> bool:
    client = aioredis.Redis.from_url(url)
    try:
        return bool((await client.info("cluster")).get("cluster_enabled"))
    finally:
        await client.aclose()


async def _claim_and_confirm(dedup: RecordDeduplicator, tenant: str, ids: list[str]) -> list[bool]:
    claim = await dedup.claim(tenant, ids)
    await dedup.confirm(tenant, claim)
    return claim.new


async def _flood(dedup: RecordDeduplicator) -> None:
    """Tenant "flood" claims and writes 400 fresh ids: five times its budget."""
    for n in range(0, 400, 40):
        await _claim_and_confirm(dedup, "flood", [f"f{i}" for i in range(n, n + 40)])


async def _two_processes(
    app_client: Any, settings_for: Any, backend: str, tmp_path: Any
) -> list[RecordDeduplicator]:
    """The dedup of two processes sharing ``backend``."""
    found = []
    for name in ("one", "two"):
        settings = settings_for(
            backend, dedup_redis_tenant_max_ids=BUDGET, data_dir=str(tmp_path / name)
        )
        found.append((await app_client(settings)).app[RECORD_DEDUP])
    return found


@EVERY_REDIS
async def test_a_tenant_past_its_budget_adds_no_more_ids_to_redis(
    app_client: Any, settings_for: Any, backend: str
) -> None:
    client = await app_client(settings_for(backend, dedup_redis_tenant_max_ids=BUDGET))
    dedup = client.app[RECORD_DEDUP]
    for n in range(0, 300, 10):
        await _claim_and_confirm(dedup, "flood", [f"r{i}" for i in range(n, n + 10)])
    held = await _ids_in_redis(backend, "flood")
    assert 0 < held <= BUDGET
    assert client.app[METRICS].dedup_kept_in_process._value.get() == 300 - held


@EVERY_REDIS
async def test_ids_kept_in_process_past_the_budget_are_still_duplicates(
    budgeted: RecordDeduplicator, backend: str
) -> None:
    dedup = budgeted
    ids = [f"r{i}" for i in range(200)]
    for n in range(0, 200, 20):
        assert await _claim_and_confirm(dedup, "flood", ids[n : n + 20]) == [True] * 20
    # Those in Redis and those only in this process alike.
    assert await _claim_and_confirm(dedup, "flood", ids) == [False] * 200


@EVERY_REDIS
async def test_another_tenant_keeps_its_shared_dedup_while_one_floods(
    app_client: Any, settings_for: Any, backend: str, tmp_path: Any
) -> None:
    one, two = await _two_processes(app_client, settings_for, backend, tmp_path)
    await _flood(one)
    assert await _claim_and_confirm(one, "calm", ["c1", "c2"]) == [True, True]
    # Written through one process, a duplicate for the other: calm's ids are in Redis.
    assert await _claim_and_confirm(two, "calm", ["c1", "c2"]) == [False, False]


@EVERY_REDIS
async def test_ids_redis_held_before_the_budget_filled_stay_duplicates_everywhere(
    app_client: Any, settings_for: Any, backend: str, tmp_path: Any
) -> None:
    one, two = await _two_processes(app_client, settings_for, backend, tmp_path)
    await _claim_and_confirm(one, "flood", ["early"])
    await _flood(one)
    assert await _claim_and_confirm(two, "flood", ["early"]) == [False]


@EVERY_REDIS
async def test_a_released_claim_kept_in_process_can_be_claimed_again(
    budgeted: RecordDeduplicator, backend: str
) -> None:
    dedup = budgeted
    await _flood(dedup)
    # One id claimed into each (Cluster) slot's last room, then one kept here.
    for n in range(1000):
        claim = await dedup.claim("flood", [f"late{n}"])
        if claim.held_here:
            break
        await dedup.confirm("flood", claim)
    assert claim.held_here == frozenset({f"late{n}"})
    await dedup.release("flood", claim)  # its write failed
    assert (await dedup.claim("flood", [f"late{n}"])).new == [True]


@EVERY_REDIS
async def test_the_budget_frees_as_the_window_passes(
    app_client: Any, settings_for: Any, backend: str
) -> None:
    client = await app_client(
        settings_for(backend, dedup_redis_tenant_max_ids=BUDGET, dedup_window_s=2)
    )
    dedup = client.app[RECORD_DEDUP]
    await _flood(dedup)
    assert (await dedup.claim("flood", [f"late{n}" for n in range(40)])).held_here
    await asyncio.sleep(3.2)  # the window and a bucket past the last count
    assert not (await dedup.claim("flood", ["later"])).held_here


@EVERY_REDIS
async def test_a_flooding_tenants_batches_are_still_answered_and_written_once(
    app_client: Any, make_settings: Any, api_keys: KeyMaker, backend: str
) -> None:
    flooder = api_keys.create(tenant="flood")
    client = await app_client(
        make_settings(
            keys_file=str(api_keys.path),
            auth_disabled=False,
            rate_limits_enabled=False,
            feature_dims=(4,),
            redis_url=backend,
            dedup_redis_tenant_max_ids=BUDGET,
        )
    )
    headers = {"X-API-Key": flooder}

    def batch(start: int) -> dict[str, object]:
        records = [{"record_id": f"r{i}", "features": [1.0] * 4} for i in range(start, start + 50)]
        return {"source": "s", "records": records}

    for start in range(0, 300, 50):
        response = await client.post(PATH, json=batch(start), headers=headers)
        assert (response.status, (await response.json())["records_accepted"]) == (202, 50)
    again = await client.post(PATH, json=batch(250), headers=headers)
    assert (await again.json())["records_duplicate"] == 50
    assert client.app[RECORD_SINK].next_offset == 300


async def _fill_to(dedup: RecordDeduplicator, count: int) -> None:
    """Tenant "flood" claims and writes ``count`` fresh ids, one call each."""
    for n in range(count):
        await _claim_and_confirm(dedup, "flood", [f"fill{n}"])


async def _kept_here_then_room(dedup: RecordDeduplicator) -> Claim:
    """A claim of 10 ids of which 5 are kept here (the budget full), then room for 5
    more in Redis again (another claim's 5 ids released)."""
    await _fill_to(dedup, BUDGET - 10)
    spare = await dedup.claim("flood", [f"spare{n}" for n in range(5)])
    claim = await dedup.claim("flood", [f"x{n}" for n in range(10)])
    assert len(claim.held_here) == 5
    await dedup.release("flood", spare)
    return claim


@STANDALONE
async def test_an_id_kept_here_stays_a_duplicate_when_redis_has_room_again(
    budgeted: RecordDeduplicator, backend: str
) -> None:
    dedup = budgeted
    claim = await _kept_here_then_room(dedup)
    await dedup.confirm("flood", claim)
    for record_id in sorted(claim.held_here):
        assert (await dedup.claim("flood", [record_id])).new == [False]


@STANDALONE
async def test_an_id_kept_here_in_flight_is_not_claimed_twice(
    budgeted: RecordDeduplicator, backend: str
) -> None:
    dedup = budgeted
    first = await _kept_here_then_room(dedup)
    waiting = asyncio.create_task(dedup.claim("flood", [sorted(first.held_here)[0]]))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # in flight for the first claim
    await dedup.confirm("flood", first)
    assert (await waiting).new == [False]


@STANDALONE
async def test_a_batch_larger_than_the_room_left_fills_it_and_keeps_the_rest_here(
    budgeted: RecordDeduplicator, backend: str
) -> None:
    claim = await budgeted.claim("flood", [f"b{n}" for n in range(100)])
    assert claim.new == [True] * 100
    assert len(claim.held_here) == 100 - BUDGET
    assert await _ids_in_redis(backend, "flood") == BUDGET


@EVERY_REDIS
async def test_released_claims_give_their_budget_back(
    budgeted: RecordDeduplicator, backend: str
) -> None:
    dedup = budgeted
    ids = [f"retry{n}" for n in range(40)]
    for _ in range(10):  # a write that keeps failing, retried: 400 claims of 40 ids
        claim = await dedup.claim("flood", ids)
        assert not claim.held_here
        await dedup.release("flood", claim)
    assert not (await dedup.claim("flood", ids)).held_here
