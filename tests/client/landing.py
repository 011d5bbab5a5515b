"""What landed in the topic, checked against the producer's delivery reports."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlgate_client import Delivery

from tests.support import read_topic

FEATURES = [0.5, 1.5, 2.5, 3.5]  # the 4 dims service_process serves by default


@dataclass
class KafkaService:
    """An mlgate process and the topic it writes to."""

    service: Any
    bootstrap: str
    topic: str

    @property
    def url(self) -> str:
        return str(self.service.url)

    async def landed(self, expected: int) -> Counter[str]:
        """How many times each record_id (the Kafka key) is in the topic."""
        messages = await read_topic(self.bootstrap, self.topic, expected=expected)
        return Counter(m.key.decode() for m in messages)


StartKafkaService = Callable[..., KafkaService]


async def reports(futures: list[asyncio.Future[Delivery]]) -> list[Delivery]:
    """Every future's Delivery (a failed one raises)."""
    return list(await asyncio.gather(*futures))


def assert_landed_exactly_once(landed: Counter[str], delivered: list[Delivery]) -> None:
    """Each delivered record is in the topic once, and nothing else is."""
    twice = {record_id: n for record_id, n in landed.items() if n > 1}
    assert not twice, f"landed more than once: {list(twice.items())[:5]}"
    delivered_ids = {d.record_id for d in delivered if d.delivered}
    assert set(landed) == delivered_ids
