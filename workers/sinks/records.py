"""The unit every sink writes: a keyed, encoded record with its Kafka headers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec


class OutboundRecord(msgspec.Struct, frozen=True, array_like=True, gc=False):
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


class RecordSink(Protocol):
    """What the ingestion routes write to: Kafka writers or the local log."""

    name: str

    async def write(
        self, records: list[OutboundRecord], lane: str = "", tenants: Sequence[tuple[str, int]] = ()
    ) -> None:
        """Return once the records are durable. ``lane``: the shared lane (``""``)
        or a heavy tenant's own; a sink that queues writes takes the lanes in turn,
        each lane's in order. ``tenants``: whose records they are, in their order,
        as runs of (tenant, how many), for a sink that shares out a bound store.

        Raises ``MailboxFull`` at once when there is no room, ``WorkerError`` subclasses
        when the write cannot be done.
        """
        ...

    async def close(self, drain_s: float = 10.0) -> None: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def problem(self) -> str | None:
        """Why it is not healthy, for ``/ready`` (None when it is)."""
        ...
