"""Scale-out on test hosts: three mlgate hosts in network namespaces of their own behind
HAProxy (deploy/haproxy.cfg), sharing one Redis and one Kafka (tests/system/multi_host.py).

Producers post batches with unique ``record_id``s and an ``Idempotency-Key`` per batch,
retrying anything but a 202 with the same body and key (a well-behaved producer). Each
scenario prints a row:

    requests    answers and connection errors seen by the producers
    202s        batches acknowledged
    landed      distinct acknowledged record ids found in the topic
    duplicates  messages in the topic beyond one per record id
    failed      answers >= 500 or 409, and connection errors
    limit error how far the accepted count is from the configured limit
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import aiohttp
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.processes import cpu_seconds
from tests.redis_cluster import RedisClusterProcesses
from tests.support import read_topic
from tests.system.multi_host import Rig, RigUnavailable

HOST_ENV = {
    # Limits out of the producers' way, but for the key that tests them.
    "MLGATE_RATE_LIMIT_KEY_RATE": "100000",
    "MLGATE_RATE_LIMIT_KEY_BURST": "100000",
    "MLGATE_RATE_LIMIT_TENANT_RATE": "100000",
    "MLGATE_RATE_LIMIT_TENANT_BURST": "100000",
    # Claims a killed host held lapse soon, so retries of its requests get through.
    "MLGATE_IDEMPOTENCY_LOCK_S": "2",
    "MLGATE_KAFKA_REQUEST_TIMEOUT_MS": "3000",
}
LIMIT_RATE = 100.0  # requests per second
LIMIT_BURST = 20
SLOW = 0.01  # tokens per second: no refill within a test
AFTER_FAILOVER_BURST = 6
BATCH = 20
PRODUCERS = 4
HEADER = "| scenario | requests | 202s | landed | duplicates | failed requests | limit error |"


@dataclass
class Hosts:
    rig: Rig
    key: str  # limits far away
    limited_key: str  # LIMIT_RATE / LIMIT_BURST, its own tenant
    after_failover_key: str  # SLOW / AFTER_FAILOVER_BURST, its own tenant
    cluster: RedisClusterProcesses | None


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    rig = Rig(tmp_path_factory.mktemp("multi_host"), redis_cluster=True)
    # Keys first: every host reads the one shared keys file at start.
    key = rig.keys.create(tenant="bulk")
    limited = rig.keys.create(tenant="limited", rate=LIMIT_RATE, burst=LIMIT_BURST)
    after_failover = rig.keys.create(tenant="failover", rate=SLOW, burst=AFTER_FAILOVER_BURST)
    try:
        rig.up(HOST_ENV)
    except RigUnavailable as exc:
        rig.down()
        pytest.skip(f"no multi-host rig on this machine: {exc}")
    except BaseException:
        rig.down()
        raise
    print(f"\n{rig.describe()}\n{HEADER}\n| --- | --- | --- | --- | --- | --- | --- |")
    yield Hosts(rig, key, limited, after_failover, rig.cluster)
    rig.down()


@dataclass
class Tally:
    scenario: str
    prefix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    requests: int = 0
    acknowledged: int = 0
    accepted: set[str] = field(default_factory=set)
    statuses: Counter[int] = field(default_factory=Counter)
    connection_errors: int = 0
    landed: int = 0
    duplicates: int = 0
    lost: int = 0
    limit_error: str = "-"
    progress: asyncio.Event = field(default_factory=asyncio.Event, repr=False)  # set on every 202

    @property
    def failed(self) -> int:
        answered = sum(n for status, n in self.statuses.items() if status >= 500 or status == 409)
        return answered + self.connection_errors

    def row(self) -> str:
        return (
            f"| {self.scenario} | {self.requests} | {self.acknowledged} | {self.landed} "
            f"| {self.duplicates} | {self.failed} | {self.limit_error} |"
        )


def _batch(prefix: str, number: int, size: int, features: list[float]) -> bytes:
    return msgspec.json.encode({
        "source": "multi-host",
        "records": [
            {"record_id": f"{prefix}-{number}-{i}", "features": features} for i in range(size)
        ],
    })


async def produce(
    url: Callable[[], str],
    key: str,
    tally: Tally,
    stop: asyncio.Event,
    worker: int,
    size: int = BATCH,
    dims: int = 4,
) -> None:
    """Batch after batch until ``stop``; each retried, same body and key, until a 202."""
    features = [0.5] * dims
    number = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        while not stop.is_set():
            name = f"{tally.prefix}.{worker}.{number}"
            body = _batch(name, 0, size, features)
            headers = {"X-API-Key": key, "Idempotency-Key": name, "Content-Type": "application/json"}
            while True:
                tally.requests += 1
                try:
                    async with session.post(f"{url()}/api/v2/ingest", data=body, headers=headers) as response:
                        tally.statuses[response.status] += 1
                        await response.read()
                        if response.status == 202:
                            tally.acknowledged += 1
                            tally.progress.set()
                            tally.accepted.update(f"{name}-0-{i}" for i in range(size))
                            break
                        assert response.status in (409, 429) or response.status >= 500, response.status
                except (TimeoutError, aiohttp.ClientError):
                    tally.connection_errors += 1
                await asyncio.sleep(0.05)
            number += 1


async def under_load(
    hosts: Hosts,
    tally: Tally,
    during: Callable[[], Awaitable[None]],
    producers: int = PRODUCERS,
    **batch: int,
) -> None:
    """Producers through the balancer while ``during`` runs (and a moment each side)."""
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(produce(lambda: hosts.rig.balancer, hosts.key, tally, stop, n, **batch))
        for n in range(producers)
    ]
    try:
        await _until_acknowledged(tally, 20)
        await during()
        await _until_acknowledged(tally, tally.acknowledged + 20)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 90)


async def _until_acknowledged(tally: Tally, batches: int) -> None:
    while tally.acknowledged < batches:
        tally.progress.clear()
        await tally.progress.wait()


async def settle(hosts: Hosts, tally: Tally) -> Tally:
    """Read the topic back and account for this scenario's records."""
    # The rig's topic holds the earlier scenarios' records too: wait for this one's.
    messages = await read_topic(
        hosts.rig.bootstrap, hosts.rig.topic, expected=len(tally.accepted), wait_s=60,
        keys={key.encode() for key in tally.accepted},
    )
    mine = Counter(
        key for key in (m.key.decode() for m in messages) if key.startswith(f"{tally.prefix}.")
    )
    tally.landed = len(tally.accepted & mine.keys())
    tally.duplicates = sum(count - 1 for count in mine.values())
    tally.lost = len(tally.accepted - mine.keys())
    print(tally.row())
    return tally


async def _ingest(session: aiohttp.ClientSession, url: str, key: str, body: dict[str, object], **headers: str):
    async with session.post(
        f"{url}/api/v2/ingest", json=body, headers={"X-API-Key": key, **headers}
    ) as response:
        return response.status, dict(response.headers), await response.json()


def _served_by_each(hosts: Hosts) -> dict[str, int]:
    return hosts.rig.server_counts("req_tot")


async def test_a_tenant_limit_holds_across_all_hosts_behind_the_balancer(hosts: Hosts) -> None:
    tally = Tally("rate limit across 3 hosts")
    body = msgspec.json.encode({"source": "limit", "records": [{"features": [1.0, 2.0, 3.0, 4.0]}]})
    before = _served_by_each(hosts)
    stop = asyncio.Event()

    async def hammer() -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                tally.requests += 1
                async with session.post(
                    f"{hosts.rig.balancer}/api/v2/ingest",
                    data=body,
                    headers={"X-API-Key": hosts.limited_key, "Content-Type": "application/json"},
                ) as response:
                    await response.read()
                    tally.statuses[response.status] += 1
                    tally.acknowledged += response.status == 202

    started = time.monotonic()
    tasks = [asyncio.create_task(hammer()) for _ in range(8)]
    await asyncio.sleep(4.0)  # the measured interval itself
    stop.set()
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    allowed = LIMIT_BURST + LIMIT_RATE * elapsed
    error = tally.acknowledged / allowed - 1
    tally.limit_error = f"{error:+.1%} ({tally.acknowledged} vs {allowed:.0f} allowed)"
    print(tally.row())
    served = {name: count - before[name] for name, count in _served_by_each(hosts).items()}
    assert all(count > 0 for count in served.values()), served
    assert tally.statuses[429] > tally.acknowledged  # offered well over the limit
    assert set(tally.statuses) == {202, 429}
    assert abs(error) <= 0.10


async def test_an_idempotency_key_answered_by_one_host_is_replayed_by_another(hosts: Hosts) -> None:
    one, two = hosts.rig.hosts[0], hosts.rig.hosts[1]
    key = uuid.uuid4().hex
    body = {"source": "replay", "records": [{"record_id": f"replay-{key}", "features": [1.0, 2.0, 3.0, 4.0]}]}
    async with aiohttp.ClientSession() as session:
        first = await _ingest(session, one.url, hosts.key, body, **{"Idempotency-Key": key})
        again = await _ingest(session, two.url, hosts.key, body, **{"Idempotency-Key": key})
    assert first[0] == again[0] == 202
    assert again[1].get("Idempotent-Replayed") == "true"
    assert again[2] == first[2]
    messages = await read_topic(hosts.rig.bootstrap, hosts.rig.topic, expected=1)
    assert [m.key.decode() for m in messages].count(f"replay-{key}") == 1


async def test_a_record_id_written_by_one_host_is_a_duplicate_on_another(hosts: Hosts) -> None:
    one, three = hosts.rig.hosts[0], hosts.rig.hosts[2]
    record_id = f"dup-{uuid.uuid4().hex}"
    body = {"source": "dup", "records": [{"record_id": record_id, "features": [1.0, 2.0, 3.0, 4.0]}]}
    async with aiohttp.ClientSession() as session:
        first = await _ingest(session, one.url, hosts.key, body)
        again = await _ingest(session, three.url, hosts.key, body)
    assert (first[0], first[2]["records_accepted"], first[2]["records_duplicate"]) == (202, 1, 0)
    assert (again[0], again[2]["records_accepted"], again[2]["records_duplicate"]) == (202, 0, 1)
    messages = await read_topic(hosts.rig.bootstrap, hosts.rig.topic, expected=1)
    assert [m.key.decode() for m in messages].count(record_id) == 1


async def test_a_host_killed_under_load_loses_no_acknowledged_record(hosts: Hosts) -> None:
    """Writes twice at most the batches the kill caught between Kafka's acknowledgement
    and the host's confirming their record_ids in Redis: their claims lapse
    (MLGATE_IDEMPOTENCY_LOCK_S) and the producer's retry is written by another host."""
    tally = Tally("host2 SIGKILL under load, restarted")
    victim = hosts.rig.hosts[1]

    async def kill() -> None:
        victim.send(signal.SIGKILL)
        await asyncio.to_thread(victim.wait_exit, 10)
        await asyncio.to_thread(hosts.rig.wait_balanced, {0, 2})

    try:
        await under_load(hosts, tally, kill)
    finally:
        await asyncio.to_thread(victim.start)
        await asyncio.to_thread(hosts.rig.wait_balanced, {0, 1, 2})
    await settle(hosts, tally)
    assert tally.accepted
    assert tally.lost == 0
    assert tally.duplicates <= BATCH * PRODUCERS  # one batch in flight per producer at most


async def test_a_rolling_restart_behind_the_balancer_fails_no_request(hosts: Hosts) -> None:
    tally = Tally("rolling restart (SIGTERM, drain by /ready)")
    everyone = set(range(len(hosts.rig.hosts)))

    async def roll() -> None:
        for index, host in enumerate(hosts.rig.hosts):
            host.send(signal.SIGTERM)
            assert await asyncio.to_thread(host.wait_exit, 30) == 0
            await asyncio.to_thread(hosts.rig.wait_balanced, everyone - {index})
            await asyncio.to_thread(host.start)
            await asyncio.to_thread(hosts.rig.wait_balanced, everyone)

    await under_load(hosts, tally, roll)
    await settle(hosts, tally)
    assert tally.failed == 0, tally.statuses
    assert tally.lost == 0
    assert tally.duplicates == 0


async def test_three_hosts_carry_steady_ingest_through_the_balancer(hosts: Hosts) -> None:
    """Prints the records/s the three hosts took and the cores they used for it (the
    check of docs/capacity.md); asserts only that everything acknowledged landed."""
    tally = Tally("steady ingest, 500 x 128 features")
    pids = [host.pid for host in hosts.rig.hosts]
    cpu_before = [cpu_seconds(pid) or 0.0 for pid in pids if pid]
    started = time.monotonic()

    async def hold() -> None:
        await asyncio.sleep(5.0)  # the measured interval itself

    await under_load(hosts, tally, hold, producers=6, size=500, dims=128)
    elapsed = time.monotonic() - started
    cores = sum((cpu_seconds(pid) or 0.0) for pid in pids if pid) - sum(cpu_before)
    await settle(hosts, tally)
    rate = len(tally.accepted) / elapsed
    print(
        f"measured: {rate:,.0f} records/s through HAProxy over {elapsed:.1f} s; the 3 hosts "
        f"used {cores / elapsed:.2f} cores, {len(tally.accepted) / cores:,.0f} records per core-second"
    )
    assert tally.lost == 0


async def _redis_breakers(hosts: Hosts) -> list[float]:
    states = []
    async with aiohttp.ClientSession() as session:
        for host in hosts.rig.hosts:
            async with session.get(f"{host.url}/metrics") as response:
                text = await response.text()
            states += [
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "mlgate_breaker_state" and sample.labels.get("dependency") == "redis"
            ]
    return states


async def test_a_redis_cluster_master_killed_under_load_answers_503_at_most_and_limits_are_shared_again(
    hosts: Hosts,
) -> None:
    """Runs last: the cluster it leaves has lost a node.

    The producers send an ``Idempotency-Key``: while their tenant's slot has no master,
    its claim cannot be made and the request is refused 503 with ``Retry-After`` (it
    would otherwise run without knowing whether it ran before); never a 500.

    A breaker opened by the dead master lets a trial call through only when a request
    comes ``MLGATE_REDIS_BREAKER_RESET_S`` after it opened, so the load goes on until
    every host's breaker has closed again (on a trial against the promoted replica)."""
    assert hosts.cluster is not None
    cluster = hosts.cluster
    tally = Tally("Redis Cluster master SIGKILL under load")

    async def kill_master() -> None:
        await asyncio.to_thread(cluster.kill_master, 0)
        await asyncio.to_thread(cluster.wait_for_failover, 3)
        async with asyncio.timeout(15):
            while any(state != 0 for state in await _redis_breakers(hosts)):  # noqa: ASYNC110
                await asyncio.sleep(0.2)  # a metric of other processes: polled

    async with asyncio.timeout(60):
        await under_load(hosts, tally, kill_master)
    assert set(tally.statuses) <= {202, 409, 429, 503}, tally.statuses
    statuses = []
    async with aiohttp.ClientSession() as session:
        for _ in range(AFTER_FAILOVER_BURST):
            for host in hosts.rig.hosts:
                body = {"source": "failover", "records": [{"features": [1.0, 2.0, 3.0, 4.0]}]}
                statuses.append((await _ingest(session, host.url, hosts.after_failover_key, body))[0])
    tally.limit_error = f"{statuses.count(202)} of {len(statuses)} taken, burst {AFTER_FAILOVER_BURST}"
    await settle(hosts, tally)
    assert tally.lost == 0
    assert statuses.count(202) == AFTER_FAILOVER_BURST  # one bucket for all three hosts
