"""Fixtures that start real things: a Tansu Kafka broker, redis-server, the app."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from mlgate.config import Settings, load_settings
from mlgate.service.app import create_app
from tests.redis_cluster import RedisClusterProcesses, start_redis_cluster
from tests.service_process import ServiceProcess
from tests.support import (
    KafkaBroker,
    KeyMaker,
    ManagedProcess,
    create_topic,
    free_port,
    start_redis,
    start_tansu,
)


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    broker = start_tansu()
    yield broker
    broker.stop()


@pytest.fixture
def private_kafka_broker() -> Iterator[KafkaBroker]:
    """A broker of the test's own, for tests that stop and restart it."""
    broker = start_tansu()
    yield broker
    broker.stop()


@pytest.fixture
def redis_server() -> Iterator[ManagedProcess]:
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
async def kafka_topic(kafka_broker: KafkaBroker) -> str:
    return await create_topic(kafka_broker.bootstrap)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcesses]:
    """A 3-master, 3-replica Redis Cluster shared by the session (flushed per test by
    ``backend``); a test that kills a node starts one of its own (``start_redis_cluster``)."""
    cluster = start_redis_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def settings_defaults() -> dict[str, Any]:
    """Defaults ``make_settings`` applies under the test's own overrides (``backend``
    sets ``redis_mode`` here)."""
    return {}


@pytest.fixture
def make_settings(tmp_path: Path, settings_defaults: dict[str, Any]) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        for name, value in settings_defaults.items():
            overrides.setdefault(name, value)
        overrides.setdefault("data_dir", str(tmp_path / "data"))
        overrides.setdefault("model_poll_interval_s", 0)
        # Tests of other features run without keys; auth tests switch it back on.
        overrides.setdefault("auth_disabled", True)
        return load_settings({}, **overrides)

    return make


@pytest.fixture
def api_keys(tmp_path: Path) -> KeyMaker:
    """API keys in a keys file of the test's own: ``make_settings(keys_file=str(api_keys.path),
    auth_disabled=False)`` serves them."""
    return KeyMaker(tmp_path / "keys.json")


AppClientFactory = Callable[[Settings], Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def app_client(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
) -> AsyncIterator[AppClientFactory]:
    """Build the app with the real factory and a client talking to it over a socket."""

    async def make(settings: Settings) -> TestClient[web.Request, web.Application]:
        return await aiohttp_client(create_app(settings))

    yield make
    await asyncio.sleep(0)


ServiceFactory = Callable[..., ServiceProcess]


@pytest.fixture
def service_process(tmp_path: Path) -> Iterator[ServiceFactory]:
    """Start ``mlgate serve [args]`` with ``MLGATE_*`` overrides; stopped after."""
    started: list[ServiceProcess] = []

    def start(*args: str, wait: bool = True, scheme: str = "http", **env: str) -> ServiceProcess:
        name = f"service{len(started)}"
        service = ServiceProcess(
            port=free_port(),
            data_dir=tmp_path / name / "data",
            output=tmp_path / f"{name}.log",
            args=list(args),
            env=env,
            scheme=scheme,
        )
        service.data_dir.parent.mkdir(parents=True, exist_ok=True)
        started.append(service)
        service.start(wait=wait)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture(params=["local", "redis", "cluster"])
def backend(request: pytest.FixtureRequest) -> str | None:
    """Shared state in process (None), in a fresh redis-server, or in the session's
    Redis Cluster, flushed (its seeds; ``make_settings`` then defaults to
    ``redis_mode="cluster"``; with either, to a 5 s ``redis_timeout_ms``): tests that take this fixture run once with each."""
    if request.param == "local":
        return None
    # A working Redis on a loaded two-core CI machine (six Cluster nodes beside the
    # tests) can take longer than the 200 ms default to connect; these tests are about
    # what Redis holds, not about falling back when it is slow.
    request.getfixturevalue("settings_defaults")["redis_timeout_ms"] = 5000
    if request.param == "cluster":
        cluster: RedisClusterProcesses = request.getfixturevalue("redis_cluster")
        cluster.flush()
        request.getfixturevalue("settings_defaults")["redis_mode"] = "cluster"
        return cluster.seeds_url
    server: ManagedProcess = request.getfixturevalue("redis_server")
    return f"redis://127.0.0.1:{server.port}"


@pytest.fixture
def settings_for(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def make(redis_url: str | None = None, **overrides: Any) -> Settings:
        return make_settings(feature_dims=(4,), redis_url=redis_url, **overrides)

    return make
