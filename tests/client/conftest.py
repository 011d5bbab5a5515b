"""Fixtures for the client's tests: mlgate as a real process writing to a real topic."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from tests.client.landing import KafkaService, StartKafkaService
from tests.client.scripted import Scripted


@pytest.fixture
def kafka_service(service_process: Any, kafka_broker: Any, kafka_topic: str) -> StartKafkaService:
    """``kafka_service(**MLGATE_overrides)``: mlgate writing to a fresh topic."""

    def start(**env: str) -> KafkaService:
        service = service_process(
            MLGATE_KAFKA_BOOTSTRAP_SERVERS=kafka_broker.bootstrap,
            MLGATE_KAFKA_TOPIC=kafka_topic,
            **env,
        )
        return KafkaService(service, kafka_broker.bootstrap, kafka_topic)

    return start


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    server = Scripted()
    app = web.Application()
    app.router.add_post("/api/v2/ingest", server.handle)
    app.router.add_post("/api/v2/predict", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    await runner.cleanup()
