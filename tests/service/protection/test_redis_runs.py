"""What mlgate says of the runs of Redis it meets: a Redis started after mlgate has its
configuration checked once it answers, and a replica promoted behind the same address
(its history carried on) is no restart that lost everything."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from bench.processes import free_port, redis_command
from mlgate.service.state import METRICS
from tests.service.protection.conftest import ready_once
from tests.support import KeyMaker, ManagedProcess, until

INGEST = {"source": "s", "records": [{"features": [1.0, 2.0, 3.0, 4.0]}]}


class Proxy:
    """A TCP proxy to ``target``, which may change: what a failover behind one address
    (Sentinel and a balancer, a managed primary endpoint) looks like to a client."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        """Every connection through it closed, as the old primary's end closes them."""
        for writer in self._writers:
            writer.close()

    async def close(self) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers |= {writer, upstream_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


@pytest.fixture
async def replica(redis_server: ManagedProcess, tmp_path: Path) -> AsyncIterator[ManagedProcess]:
    """A replica of ``redis_server``, in sync. The full sync's snapshot goes over the
    socket and into the test's own directory (else dump.rdb lands where the tests run)."""
    primary = aioredis.Redis(port=redis_server.port)
    await primary.config_set("repl-diskless-sync", "yes")
    await primary.config_set("repl-diskless-sync-delay", 0)
    await primary.aclose()
    port = free_port()
    server = ManagedProcess(
        [*redis_command(port), "--dir", str(tmp_path), "--replicaof", "127.0.0.1", str(redis_server.port)], port
    )
    server.start()
    connection = aioredis.Redis(port=port)
    try:
        for _ in range(100):
            if (await connection.info("replication")).get("master_link_status") == "up":
                break
            await asyncio.sleep(0.1)
        yield server
    finally:
        await connection.aclose()
        server.stop()


async def _ingest(client, key: str, idempotency_key: str) -> int:
    response = await client.post(
        "/api/v2/ingest", json=INGEST, headers={"X-API-Key": key, "Idempotency-Key": idempotency_key}
    )
    return response.status


async def test_a_redis_started_after_mlgate_has_its_configuration_checked_once_it_answers(
    app_client, secured, api_keys: KeyMaker, redis_server: ManagedProcess
) -> None:
    """A review: with Redis down at start, neither ``redis_not_persistent`` nor
    ``redis_evicts_any_key`` was ever said of the Redis that came up later."""
    key = api_keys.create(scopes="ingest")
    redis_server.stop()
    with capture_logs() as logs:
        client = await app_client(secured(redis_url=f"redis://127.0.0.1:{redis_server.port}"))
        redis_server.start()
        for attempt in range(50):
            if await _ingest(client, key, f"late-{attempt}") == 202:
                break
            await ready_once(client, lambda body: "degraded" not in body)
        await until(lambda: any(entry["event"] == "redis_not_persistent" for entry in logs))
    assert [entry["event"] for entry in logs].count("redis_not_persistent") == 1


async def test_a_replica_promoted_behind_the_same_address_is_no_restart(
    app_client, secured, api_keys: KeyMaker, redis_server: ManagedProcess, replica: ManagedProcess
) -> None:
    """A review: a failover behind one address was logged as a restart that lost every
    idempotency answer and dedup id, and counted; the replay then worked."""
    key = api_keys.create(scopes="ingest")
    proxy = Proxy(redis_server.port)
    await proxy.start()
    try:
        client = await app_client(secured(redis_url=f"redis://127.0.0.1:{proxy.port}"))
        assert await _ingest(client, key, "before") == 202
        # Until the replica holds the answer: a failover loses what was not replicated
        # yet (under load the promotion could come first, and nothing was to replay).
        master = aioredis.Redis(port=redis_server.port)
        assert await master.execute_command("WAIT", 1, 5000) == 1
        await master.aclose()
        promoted = aioredis.Redis(port=replica.port)
        await promoted.execute_command("REPLICAOF", "NO", "ONE")
        await promoted.config_set("maxmemory-policy", "allkeys-lru")
        await promoted.aclose()
        proxy.target = replica.port
        proxy.cut()
        with capture_logs() as logs:
            replayed = await client.post(
                "/api/v2/ingest", json=INGEST, headers={"X-API-Key": key, "Idempotency-Key": "before"}
            )
            for _ in range(50):
                if replayed.status == 202:
                    break
                await ready_once(client, lambda body: "degraded" not in body)
                replayed = await client.post(
                    "/api/v2/ingest", json=INGEST, headers={"X-API-Key": key, "Idempotency-Key": "before"}
                )
            await until(lambda: any(entry["event"] == "redis_evicts_any_key" for entry in logs))
        assert replayed.headers.get("Idempotent-Replayed") == "true"
        events = [entry["event"] for entry in logs]
        assert "redis_run_changed" in events and "redis_restarted" not in events
        assert "redis_evicts_any_key" in events  # the new server's configuration checked
        assert client.app[METRICS].registry.get_sample_value("mlgate_redis_restarts_total") == 0.0
    finally:
        await proxy.close()
