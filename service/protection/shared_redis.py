"""SharedRedis: the app's one Redis client, behind a breaker, for state shared by processes.

Rate-limit buckets, idempotency records, record-id dedup and API keys kept in Redis
all go through ``SharedRedis.call``. Every call is bounded by short socket timeouts
(``MLGATE_REDIS_TIMEOUT_MS``) and no retries, so Redis can never hang a request; a
failure or an open breaker raises ``RedisUnavailable`` and the caller falls back to
its in-process state. The switch to and from the fallback is logged once each way and
every fallback is counted (``mlgate_redis_fallback{operation}``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from mlgate.config import Settings
from mlgate.workers.breaker import Breaker, BreakerOpen

T = TypeVar("T")
log = structlog.get_logger("mlgate.redis")


class RedisUnavailable(Exception):
    """Redis failed, timed out or its breaker is open; use the local fallback."""


class SharedRedis:
    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 0.2,
        fail_max: int = 3,
        reset_s: float = 2.0,
        on_fallback: Callable[[str], None] | None = None,
    ) -> None:
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # redis-py retries with backoff by default; a request must not wait for that.
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            client_name="mlgate",
        )
        self.breaker = Breaker("redis", fail_max=fail_max, reset_s=reset_s, exclude=())
        self._on_fallback = on_fallback
        self._down = False

    @classmethod
    def from_settings(
        cls, settings: Settings, on_fallback: Callable[[str], None] | None = None
    ) -> SharedRedis:
        assert settings.redis_url
        return cls(
            settings.redis_url,
            timeout_s=settings.redis_timeout_ms / 1000,
            fail_max=settings.redis_breaker_fail_max,
            reset_s=settings.redis_breaker_reset_s,
            on_fallback=on_fallback,
        )

    @property
    def available(self) -> bool:
        """False while the last call failed or the breaker is open."""
        return not self._down

    def script(self, source: str) -> AsyncScript:
        """A Lua script run with EVALSHA (loaded again by redis-py after a Redis restart)."""
        return self.client.register_script(source)

    async def call(self, operation: str, func: Callable[[], Awaitable[T]]) -> T:
        """``await func()`` through the breaker; ``RedisUnavailable`` instead of any failure."""
        try:
            result = await self.breaker.call(func)
        except (BreakerOpen, RedisError, OSError, TimeoutError) as exc:
            self._fell_back(operation, exc)
            raise RedisUnavailable(operation) from exc
        if self._down:
            self._down = False
            log.info("redis_recovered", operation=operation)
        return result

    async def ping(self) -> bool:
        try:
            await self.call("ping", self.client.ping)
        except RedisUnavailable:
            return False
        return True

    async def close(self) -> None:
        await self.client.aclose()

    def _fell_back(self, operation: str, exc: BaseException) -> None:
        if self._on_fallback is not None:
            self._on_fallback(operation)
        if not self._down:
            self._down = True
            log.warning(
                "redis_unavailable",
                operation=operation,
                error=f"{type(exc).__name__}: {exc}",
                fallback="in-process state until Redis answers again",
            )
