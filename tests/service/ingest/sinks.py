"""Test sinks: the app's own sink behind a wrapper that changes how ``write`` behaves."""

from __future__ import annotations

from mlgate.workers.sinks.records import OutboundRecord, RecordSink


class WrappedSink:
    """Writes go to the app's sink; subclasses put something in front of them."""

    name = "wrapped"

    def __init__(self, sink: RecordSink) -> None:
        self._sink = sink

    async def write(self, records: list[OutboundRecord], lane: str = "", tenants=()) -> None:
        await self._sink.write(records, lane, tenants)

    async def close(self, drain_s: float = 10.0) -> None:
        await self._sink.close(drain_s)

    @property
    def healthy(self) -> bool:
        return True

    @property
    def problem(self) -> str | None:
        return None
