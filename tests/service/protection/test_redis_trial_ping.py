"""The ping the Redis sampler starts (a breaker's trial, or a quiet host's check) runs
in a context of its own, whoever asked for the sample."""

from __future__ import annotations

from typing import Any

import pytest
import structlog

from mlgate.service import lifecycles
from mlgate.service.protection.shared_redis import SharedRedis
from mlgate.service.state import METRICS
from tests.support import ManagedProcess, until


async def test_a_ping_a_readiness_check_starts_carries_no_request_id(
    app_client: Any, secured: Any, redis_server: ManagedProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: ``redis_master_replaced``, logged by that ping, carried the id of the
    ``/ready`` request whose sample had started it."""
    seen: list[dict[str, Any]] = []
    ping = SharedRedis.ping

    async def recorded(self: SharedRedis, *, past_breakers: bool = False) -> bool:
        seen.append(structlog.contextvars.get_contextvars())
        return await ping(self, past_breakers=past_breakers)

    monkeypatch.setattr(SharedRedis, "ping", recorded)
    monkeypatch.setattr(lifecycles, "REDIS_QUIET_PING_S", 0.0)  # a ping at every sample
    client = await app_client(secured(redis_url=f"redis://127.0.0.1:{redis_server.port}"))
    sample = client.app[METRICS].samplers["redis_breaker"]
    seen.clear()
    with structlog.contextvars.bound_contextvars(request_id="a-ready-request"):
        # A sample starts a ping once the one before has answered.
        await until(lambda: sample() is None and len(seen) >= 3)
    assert [context.get("request_id") for context in seen] == [None] * len(seen)
