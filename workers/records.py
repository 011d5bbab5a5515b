"""The unit every sink writes: a keyed, encoded record with its Kafka headers."""

from __future__ import annotations

import asyncio
from typing import Protocol

import msgspec


class OutboundRecord(msgspec.Struct, frozen=True, array_like=True):
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


class RecordSink(Protocol):
    """What the ingestion routes write to: Kafka writers or the local log."""

    name: str

    def submit(self, records: list[OutboundRecord]) -> asyncio.Future[None]:
        """Queue records; the future resolves once they are durable.

        Raises ``MailboxFull`` at once when there is no room.
        """
        ...

    @property
    def healthy(self) -> bool: ...
