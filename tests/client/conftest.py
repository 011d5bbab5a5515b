"""Fixtures for the client's tests: mlgate as a real process writing to a real topic."""

from __future__ import annotations

from typing import Any

import pytest

from tests.client.landing import KafkaService, StartKafkaService


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


