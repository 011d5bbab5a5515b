"""Rate limits: key and tenant buckets, the 429 answer, Redis-shared limits across processes,
and the local fallback while Redis is down."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp
import msgspec
import pytest
import redis.asyncio

from mlgate.service.protection.api_keys import KeyFile, KeysFileError, key_id_of
from mlgate.service.protection.rate_limits import CoalescedTakes
from mlgate.service.protection.shared_redis import RedisUnavailable, SharedRedis
from mlgate.service.state import METRICS, RELOAD_HOOKS
from tests.support import KeyMaker, ManagedProcess

INGEST = {"source": "s", "records": [{"features": [1.0, 2.0, 3.0, 4.0]}]}
SLOW = 0.01  # tokens per second: no refill within a test


async def _statuses(client, key: str, n: int) -> list[int]:
    statuses = []
    for _ in range(n):
        response = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": key})
        statuses.append(response.status)
    return statuses


async def test_key_over_its_burst_gets_429_with_retry_after(app_client, secured, api_keys) -> None:
    key = api_keys.create(rate=SLOW, burst=3)
    client = await app_client(secured())
    assert await _statuses(client, key, 3) == [202] * 3
    response = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": key})
    assert response.status == 429
    assert int(response.headers["Retry-After"]) >= 1
    assert (await response.json())["status"] == 429


async def test_a_refusals_reset_names_the_point_retry_after_names(app_client, secured, api_keys) -> None:
    """The draft: with both fields, the reset SHOULD be the same point in time as
    Retry-After (a review: ``t=4``, the time until the bucket is full, beside
    ``Retry-After: 1``)."""
    key = api_keys.create(rate=1.0, burst=4)
    client = await app_client(secured(rate_limit_tenant_rate=SLOW, rate_limit_tenant_burst=50))
    await _statuses(client, key, 4)
    response = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": key})
    assert response.status == 429
    assert response.headers["Retry-After"] == "1"
    assert response.headers["RateLimit"].startswith('"key";r=0;t=1, ')


async def test_429_carries_ietf_ratelimit_fields(app_client, secured, api_keys) -> None:
    # Buckets that refill in 100 s and more: a slow machine cannot refill them
    # between the two requests.
    key = api_keys.create(rate=SLOW, burst=1)
    client = await app_client(secured(rate_limit_tenant_rate=SLOW, rate_limit_tenant_burst=50))
    await _statuses(client, key, 1)
    response = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": key})
    assert response.status == 429
    assert response.headers["RateLimit-Policy"] == '"key";q=1;w=100, "tenant";q=50;w=5000'
    assert response.headers["RateLimit"].startswith('"key";r=0;t=100, "tenant";r=49;')


async def test_successful_answers_carry_ratelimit_fields(app_client, secured, api_keys) -> None:
    key = api_keys.create(rate=10.0, burst=20)
    client = await app_client(secured())
    response = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": key})
    assert response.status == 202
    assert response.headers["RateLimit-Policy"].startswith('"key";q=20;w=2, "tenant";')
    assert response.headers["RateLimit"].startswith('"key";r=19;t=1, ')


async def test_keys_of_one_tenant_share_the_tenant_bucket(app_client, secured, api_keys) -> None:
    first, second = api_keys.create(tenant="acme"), api_keys.create(tenant="acme")
    client = await app_client(secured(rate_limit_tenant_rate=SLOW, rate_limit_tenant_burst=4))
    assert await _statuses(client, first, 3) == [202] * 3
    assert await _statuses(client, second, 2) == [202, 429]


async def test_other_tenants_are_not_limited_by_a_busy_one(app_client, secured, api_keys) -> None:
    busy, quiet = api_keys.create(tenant="busy"), api_keys.create(tenant="quiet")
    client = await app_client(secured(rate_limit_tenant_rate=SLOW, rate_limit_tenant_burst=2))
    assert await _statuses(client, busy, 3) == [202, 202, 429]
    assert await _statuses(client, quiet, 2) == [202, 202]


async def test_refused_request_takes_no_token_from_the_tenant(app_client, secured, api_keys) -> None:
    noisy = api_keys.create(tenant="acme", rate=SLOW, burst=1)
    other = api_keys.create(tenant="acme")
    client = await app_client(secured(rate_limit_tenant_rate=SLOW, rate_limit_tenant_burst=3))
    assert await _statuses(client, noisy, 5) == [202, 429, 429, 429, 429]
    assert await _statuses(client, other, 3) == [202, 202, 429]


async def test_a_tenant_with_a_limit_of_its_own_is_held_to_it(
    app_client, secured, api_keys, backend
) -> None:
    small = api_keys.create(tenant="small", rate=1000.0, burst=1000)
    other = api_keys.create(tenant="other", rate=1000.0, burst=1000)
    client = await app_client(secured(redis_url=backend, rate_limit_tenants=(f"small={SLOW}/2",)))
    assert await _statuses(client, small, 3) == [202, 202, 429]
    assert await _statuses(client, other, 3) == [202] * 3  # the default tenant limit
    response = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": small})
    assert '"tenant";q=2;' in response.headers["RateLimit-Policy"]


async def test_open_routes_are_not_rate_limited(app_client, secured, api_keys) -> None:
    client = await app_client(secured(rate_limit_tenant_rate=SLOW, rate_limit_tenant_burst=1))
    statuses = {(await client.get("/health")).status for _ in range(5)}
    assert statuses == {200}


async def test_redis_buckets_hold_across_two_apps(
    app_client, secured, api_keys, redis_server: ManagedProcess, tmp_path
) -> None:
    key = api_keys.create(rate=SLOW, burst=4)
    redis_url = f"redis://127.0.0.1:{redis_server.port}"
    one = await app_client(secured(redis_url=redis_url, data_dir=str(tmp_path / "one")))
    two = await app_client(secured(redis_url=redis_url, data_dir=str(tmp_path / "two")))
    assert await _statuses(one, key, 2) + await _statuses(two, key, 3) == [202] * 4 + [429]


async def test_a_key_of_a_vast_burst_and_slow_rate_takes_from_redis_as_any(
    app_client, secured, api_keys, redis_server: ManagedProcess
) -> None:
    """A bucket's expiry past 1e14 ms reached PEXPIRE as ``1e+14``, which Redis
    refuses: the key's every call failed, and with it the shared breaker and every
    tenant's Redis calls (a review)."""
    vast = api_keys.create(rate=0.001, burst=10**9)
    # Past what ``keys create`` now takes (a key file of an older version, or edited):
    # an expiry of 1e17 ms, which Lua writes as 1e+17.
    key_id = key_id_of(vast)
    KeyFile(api_keys.path).update(
        lambda keys: keys.__setitem__(key_id, msgspec.structs.replace(keys[key_id], burst=10**11))
    )
    client = await app_client(
        secured(redis_url=f"redis://127.0.0.1:{redis_server.port}", redis_timeout_ms=5000)
    )
    assert await _statuses(client, vast, 6) == [202] * 6
    assert client.app[METRICS].rate_limit_fallback._value.get() == 0  # all from Redis


async def _script_calls(redis_url: str) -> int:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))


async def test_concurrent_requests_share_redis_round_trips_and_the_limit_holds(
    app_client, secured, api_keys, redis_server: ManagedProcess
) -> None:
    key = api_keys.create(rate=SLOW, burst=10)
    redis_url = f"redis://127.0.0.1:{redis_server.port}"
    # A new connection slower than the default 200 ms on a loaded host would fall back
    # to local buckets for that request; this test is about Redis answering.
    client = await app_client(secured(redis_url=redis_url, redis_timeout_ms=5000))
    calls_before = await _script_calls(redis_url)
    responses = await asyncio.gather(
        *(client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": key}) for _ in range(40))
    )
    assert Counter(response.status for response in responses) == {202: 10, 429: 30}
    assert await _script_calls(redis_url) - calls_before < 40


async def test_redis_down_falls_back_to_local_buckets_and_counts_it(
    app_client, secured, api_keys, redis_server: ManagedProcess
) -> None:
    key = api_keys.create(rate=SLOW, burst=2)
    client = await app_client(secured(redis_url=f"redis://127.0.0.1:{redis_server.port}"))
    redis_server.stop()
    assert await _statuses(client, key, 3) == [202, 202, 429]
    metrics = client.app[METRICS]
    assert metrics.rate_limit_fallback._value.get() == 3
    assert metrics.redis_fallback.labels("rate_limit")._value.get() == 3


# -- two serving processes, one redis-server ----------------------------------------


TENANT_RATE = 100.0
TENANT_BURST = 20


def _service_env(redis_port: int, keys_file: str) -> dict[str, str]:
    return {
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}",
        "MLGATE_AUTH_DISABLED": "false",
        "MLGATE_KEYS_FILE": keys_file,
        "MLGATE_RATE_LIMIT_TENANT_RATE": str(TENANT_RATE),
        "MLGATE_RATE_LIMIT_TENANT_BURST": str(TENANT_BURST),
        "MLGATE_REDIS_BREAKER_RESET_S": "0.5",
        "MLGATE_DEDUP_WINDOW_S": "0",
        "MLGATE_LOG_LEVEL": "warning",
    }


async def _load(urls_and_keys: list[tuple[str, str]], seconds: float) -> tuple[Counter[int], float]:
    """Closed-loop load on every (url, key) with 8 connections each; statuses and the time taken."""
    statuses: Counter[int] = Counter()
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.monotonic()
        deadline = started + seconds

        async def worker(url: str, key: str) -> None:
            while time.monotonic() < deadline:
                async with session.post(
                    f"{url}/api/v2/ingest", json=INGEST, headers={"X-API-Key": key}
                ) as response:
                    await response.read()
                    statuses[response.status] += 1

        await asyncio.gather(*(worker(u, k) for u, k in urls_and_keys for _ in range(8)))
        return statuses, time.monotonic() - started


@pytest.fixture
def two_services(service_process, api_keys: KeyMaker, redis_server: ManagedProcess):
    """Two ``serve`` processes sharing ``redis_server``; each with its own key of tenant acme."""
    env = _service_env(redis_server.port, str(api_keys.path))
    keys = [api_keys.create(tenant="acme", rate=10_000, burst=10_000) for _ in range(2)]
    services = [service_process(**env) for _ in range(2)]
    return [(service.url, key) for service, key in zip(services, keys, strict=True)]


async def test_two_processes_hold_the_tenant_limit_within_10_percent(two_services) -> None:
    statuses, elapsed = await _load(two_services, seconds=3.0)
    expected = TENANT_BURST + TENANT_RATE * elapsed
    assert statuses[429] > statuses[202]  # the load is well over the limit
    assert abs(statuses[202] - expected) <= 0.1 * expected, (statuses, elapsed)


async def test_redis_outage_serves_on_local_limits_and_shared_limits_return(
    two_services, redis_server: ManagedProcess
) -> None:
    redis_server.stop()
    down, down_s = await _load(two_services, seconds=1.5)
    assert down[202] > 0 and down[429] > 0 and set(down) <= {202, 429}, down
    # each process now holds the tenant to the limit on its own: up to twice the total
    assert down[202] <= 1.1 * 2 * (TENANT_BURST + TENANT_RATE * down_s), (down, down_s)

    redis_server.start()
    await asyncio.sleep(0.6)  # the Redis breaker's reset time: the next call tries Redis again
    await _load(two_services, seconds=0.5)  # closes the breakers again, empties the bucket
    back, back_s = await _load(two_services, seconds=2.0)
    expected = TENANT_RATE * back_s  # the bucket starts empty: no burst
    assert abs(back[202] - expected) <= 0.1 * expected, (back, back_s)


@pytest.mark.parametrize("when", ["before-it-ran", "mid-call"])
async def test_takes_of_a_cancelled_redis_call_are_answered_not_left_waiting(
    make_settings, redis_server: ManagedProcess, when: str
) -> None:
    shared = SharedRedis.from_settings(make_settings(redis_url=f"redis://127.0.0.1:{redis_server.port}"))
    takes = CoalescedTakes(shared)
    try:
        answers = [takes.take(("mlgate:rl:k:x", "mlgate:rl:t:x"), (1.0, 5, 1.0, 5)) for _ in range(3)]
        sender = takes._sender  # the one call carrying them
        assert sender is not None
        if when == "mid-call":
            await asyncio.sleep(0)  # it has started and awaits Redis
        sender.cancel()
        results = await asyncio.wait_for(asyncio.gather(*answers, return_exceptions=True), 2)
        assert all(isinstance(result, RedisUnavailable) for result in results)
        # and the next take gets a call of its own
        assert (await asyncio.wait_for(takes.take(("mlgate:rl:k:y", "mlgate:rl:t:y"), (1.0, 5, 1.0, 5)), 2))[0]
    finally:
        await takes.close()
        await shared.close()


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/no-such-route", 404), ("DELETE", "/v2", 405)])
async def test_an_answer_of_no_route_that_took_a_token_says_so(
    app_client, secured, api_keys, method: str, path: str, status: int
) -> None:
    """A review: aiohttp's own 404 and 405 took a token, and their answers carried no
    RateLimit fields (every other answer of the app does)."""
    key = api_keys.create(rate=SLOW, burst=5)
    client = await app_client(secured(rate_limit_tenant_rate=SLOW, rate_limit_tenant_burst=50))
    response = await client.request(method, path, headers={"X-API-Key": key})
    assert response.status == status
    assert response.headers["RateLimit-Policy"].startswith('"key";q=5;')
    assert response.headers["RateLimit"].startswith('"key";r=4;')


@pytest.mark.parametrize("rate", [0, 1e-320, 1e10])
async def test_a_keys_file_edited_to_a_rate_out_of_bounds_is_refused_the_keys_read_last_kept(
    app_client, secured, api_keys: KeyMaker, rate: float
) -> None:
    """A review: a keys file edited to a rate of 0 was read as it stood, and every
    request of the key was a 500 (a division by zero); ``keys create`` refuses it."""
    key = api_keys.create(rate=1.0, burst=5)
    client = await app_client(secured())
    document = msgspec.json.decode(api_keys.path.read_bytes())
    document["keys"][0]["rate"] = rate
    api_keys.path.write_bytes(msgspec.json.encode(document))
    with pytest.raises(KeysFileError, match="rate"):
        await client.app[RELOAD_HOOKS]["api_keys"]()
    response = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": key})
    assert response.status == 202
    assert response.headers["RateLimit-Policy"].startswith('"key";q=5;w=5')
