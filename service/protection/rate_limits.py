"""Rate limits: a token bucket per API key and one per tenant, checked together.

A request takes one token from its key's bucket and one from its tenant's, or from
neither: a request refused by one bucket costs the other nothing. Key buckets use the
key's own ``rate``/``burst`` when it has them, else ``MLGATE_RATE_LIMIT_KEY_*``;
tenant buckets use the tenant's entry in ``MLGATE_RATE_LIMIT_TENANTS`` when it has
one, else ``MLGATE_RATE_LIMIT_TENANT_*``.

With ``REDIS_URL`` both buckets live in Redis and one Lua script (EVALSHA, Redis's own
clock) checks and takes from both atomically, so the limits hold across processes and
hosts. Concurrent requests share round trips (``CoalescedTakes``): one script call in
flight at a time carries every take that arrived meanwhile, each applied in order. On a
Redis Cluster a key's bucket and its tenant's share the hash tag ``{tenant}`` (one slot,
so one take stays atomic; a tenant's buckets all live on one master), and the takes
sent together are split into one call per slot, sent concurrently. Without Redis, or while Redis fails, the buckets are this
process's own (``LocalBuckets``): the shared limit fails open to a per-process one,
which is logged and counted (``mlgate_rate_limit_local_fallback``); the next call
after the Redis breaker's reset tries Redis again.

Answers carry the IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers):
``RateLimit-Policy: "key";q=<burst>;w=<burst/rate s>, "tenant";q=...;w=...`` and
``RateLimit: "key";r=<tokens left>;t=<s until full, or with no token left until the
next one>, "tenant";...``; a refusal is 429
with ``Retry-After`` (seconds until every bucket has a token again).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import structlog

from mlgate.config import Settings
from mlgate.service.http.metrics import Metrics
from mlgate.service.protection.api_keys import ApiKey
from mlgate.service.protection.fair_share import FairShareMap
from mlgate.service.protection.shared_redis import RedisUnavailable, SharedRedis
from mlgate.workers.supervision import background_context

MAX_LOCAL_BUCKETS = 100_000
log = structlog.get_logger("mlgate.rate_limits")

# Several takes in order, each one atomic as if alone. Per take i (from 0): KEYS[2i+1],
# KEYS[2i+2] its key and tenant bucket; ARGV[4i+1..4i+4] key rate, key burst, tenant
# rate, tenant burst. Returns {allowed, key tokens left, tenant tokens left} per take,
# flattened (floats as strings: Redis would truncate Lua numbers to integers).
TAKE_TOKENS_LUA = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local function level(bucket, rate, burst)
  local state = redis.call('HMGET', bucket, 'tokens', 'at')
  if not state[1] then return burst end
  local elapsed = math.max(0, now - tonumber(state[2]))
  return math.min(burst, tonumber(state[1]) + elapsed * rate)
end
local function store(bucket, tokens, rate, burst)
  redis.call('HSET', bucket, 'tokens', tokens, 'at', now)
  -- At most 100 years: past 1e14 ms Lua writes the number as 1e+14, which PEXPIRE
  -- refuses (a review: a key of burst 1e11 at rate 0.001 failed every call it shared).
  redis.call('PEXPIRE', bucket, math.min(math.ceil(burst / rate * 1000) + 1000, 3153600000000))
end
local answers = {}
for i = 0, #KEYS / 2 - 1 do
  local key_bucket, tenant_bucket = KEYS[2 * i + 1], KEYS[2 * i + 2]
  local key_rate, key_burst = tonumber(ARGV[4 * i + 1]), tonumber(ARGV[4 * i + 2])
  local tenant_rate, tenant_burst = tonumber(ARGV[4 * i + 3]), tonumber(ARGV[4 * i + 4])
  local key_tokens = level(key_bucket, key_rate, key_burst)
  local tenant_tokens = level(tenant_bucket, tenant_rate, tenant_burst)
  local allowed = 0
  if key_tokens >= 1 and tenant_tokens >= 1 then
    allowed = 1
    key_tokens = key_tokens - 1
    tenant_tokens = tenant_tokens - 1
    store(key_bucket, key_tokens, key_rate, key_burst)
    store(tenant_bucket, tenant_tokens, tenant_rate, tenant_burst)
  end
  answers[#answers + 1] = allowed
  answers[#answers + 1] = tostring(key_tokens)
  answers[#answers + 1] = tostring(tenant_tokens)
end
return answers
"""
MAX_TAKES_PER_CALL = 256


@dataclass(frozen=True, slots=True)
class Limit:
    rate: float  # tokens added per second
    burst: int  # bucket capacity

    @property
    def window_s(self) -> int:
        return max(1, math.ceil(self.burst / self.rate))


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    key_limit: Limit
    key_tokens: float
    tenant_limit: Limit
    tenant_tokens: float

    @property
    def retry_after_s(self) -> int:
        """Seconds until both buckets hold a token again."""
        waits = [
            (1 - tokens) / limit.rate
            for limit, tokens in ((self.key_limit, self.key_tokens), (self.tenant_limit, self.tenant_tokens))
            if tokens < 1
        ]
        return max(1, math.ceil(max(waits, default=0)))

    @property
    def refused_by(self) -> str:
        return "key" if self.key_tokens < 1 else "tenant"

    def headers(self) -> dict[str, str]:
        k, t = self.key_limit, self.tenant_limit
        return {
            "RateLimit-Policy": f'"key";q={k.burst};w={k.window_s}, "tenant";q={t.burst};w={t.window_s}',
            "RateLimit": f"{_remaining('key', k, self.key_tokens)}, "
            f"{_remaining('tenant', t, self.tenant_tokens)}",
        }


def _remaining(name: str, limit: Limit, tokens: float) -> str:
    """A policy's ``r`` and ``t``: with a token left, until the bucket is full; with
    none, until the next token, the point ``Retry-After`` names, as the draft asks of
    a refusal (a review: ``t=4`` beside ``Retry-After: 1``)."""
    if tokens < 1:
        reset = max(1, math.ceil((1 - tokens) / limit.rate))
    else:
        reset = math.ceil(max(0.0, limit.burst - tokens) / limit.rate)
    return f'"{name}";r={max(0, math.floor(tokens))};t={reset}'


def tenant_limit(entry: str) -> tuple[str, Limit]:
    """``"acme=200/400"`` (``MLGATE_RATE_LIMIT_TENANTS``, checked by its pattern) ->
    ``("acme", Limit(200.0, 400))``."""
    tenant, _, limit = entry.partition("=")
    rate, _, burst = limit.partition("/")
    return tenant, Limit(float(rate), int(burst))


class LocalBuckets:
    """In-process token buckets, the same arithmetic as the Lua script; at most
    ``max_buckets`` shared fairly among tenants (``FairShareMap``), so the keys of one
    tenant can only push out (refill) that tenant's own buckets."""

    def __init__(self, max_buckets: int = MAX_LOCAL_BUCKETS) -> None:
        # tenant -> bucket name -> (tokens, at)
        self._buckets: FairShareMap[tuple[float, float]] = FairShareMap(max_buckets)

    def take(
        self, tenant: str, key_bucket: str, key_limit: Limit, tenant_bucket: str, tenant_limit: Limit
    ) -> tuple[bool, float, float]:
        now = time.monotonic()
        key_tokens = self._level(tenant, key_bucket, key_limit, now)
        tenant_tokens = self._level(tenant, tenant_bucket, tenant_limit, now)
        if key_tokens < 1 or tenant_tokens < 1:
            return False, key_tokens, tenant_tokens
        key_tokens -= 1
        tenant_tokens -= 1
        # Forgetting a bucket refills it: the cheapest safe eviction.
        self._buckets.put(tenant, key_bucket, (key_tokens, now))
        self._buckets.put(tenant, tenant_bucket, (tenant_tokens, now))
        return True, key_tokens, tenant_tokens

    def _level(self, tenant: str, bucket: str, limit: Limit, now: float) -> float:
        state = self._buckets.get(tenant, bucket)
        if state is None:
            return float(limit.burst)
        tokens, at = state
        return min(float(limit.burst), tokens + max(0.0, now - at) * limit.rate)


@dataclass(slots=True)
class _Take:
    buckets: tuple[str, str]
    args: tuple[float, int, float, int]
    answer: asyncio.Future[tuple[bool, float, float]]


class CoalescedTakes:
    """Token takes sent to Redis together: one script call in flight at a time, and the
    takes that arrive meanwhile go in the next one (up to ``MAX_TAKES_PER_CALL``).

    A round trip per request cost a predicting process about half its throughput; under
    load this is one per event-loop turn, each take as atomic and in order as alone. A
    failed call fails each of its takes with ``RedisUnavailable``.
    """

    def __init__(self, redis: SharedRedis) -> None:
        self._redis = redis
        self._script = redis.script(TAKE_TOKENS_LUA)
        self._pending: list[_Take] = []
        self._sender: asyncio.Task[None] | None = None

    def take(
        self, buckets: tuple[str, str], args: tuple[float, int, float, int]
    ) -> asyncio.Future[tuple[bool, float, float]]:
        answer = asyncio.get_running_loop().create_future()
        self._pending.append(_Take(buckets, args, answer))
        if self._sender is None:
            # Sends many requests' takes: in no request's context (its lines name none).
            self._sender = asyncio.get_running_loop().create_task(
                self._send_pending(), context=background_context()
            )
            self._sender.add_done_callback(self._sender_done)
        return answer

    def _sender_done(self, sender: asyncio.Task[None]) -> None:
        # A sender cancelled before it ran never reached its own cleanup.
        if self._sender is sender:
            self._sender = None
            _fail(self._pending, RedisUnavailable("rate_limit"))
            self._pending = []

    async def close(self) -> None:
        if self._sender is not None:
            await asyncio.gather(self._sender, return_exceptions=True)

    async def _send_pending(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:MAX_TAKES_PER_CALL]
                del self._pending[:MAX_TAKES_PER_CALL]
                await self._send(batch)
        finally:
            self._sender = None
            # Only a cancelled sender leaves takes here: they must not wait forever.
            _fail(self._pending, RedisUnavailable("rate_limit"))
            self._pending = []

    async def _send(self, batch: list[_Take]) -> None:
        """One script call per cluster slot among ``batch`` (standalone: one call)."""
        groups = self._redis.by_slot(batch, lambda take: take.buckets[0])
        if len(groups) == 1:
            await self._send_one(groups[0])
        else:
            await asyncio.gather(*(self._send_one(group) for group in groups))

    async def _send_one(self, batch: list[_Take]) -> None:
        keys = [bucket for take in batch for bucket in take.buckets]
        args = [value for take in batch for value in take.args]
        script = self._script
        try:
            flat = await self._redis.call("rate_limit", lambda: script(keys=keys, args=args), key=keys[0])
            answers = [
                (bool(flat[i]), float(flat[i + 1]), float(flat[i + 2]))
                for i in range(0, 3 * len(batch), 3)
            ]
        except asyncio.CancelledError:
            _fail(batch, RedisUnavailable("rate_limit"))
            raise
        except RedisUnavailable as exc:
            _fail(batch, exc)
            return
        except Exception as exc:
            # Whatever went wrong, every take hears of it (and falls back to the local
            # buckets): none may wait forever.
            log.error("rate_limit_reply_unusable", error=repr(exc), takes=len(batch))
            _fail(batch, RedisUnavailable("rate_limit"))
            return
        for take, answer in zip(batch, answers, strict=True):
            if not take.answer.done():
                take.answer.set_result(answer)


def _fail(takes: list[_Take], error: Exception) -> None:
    for take in takes:
        if not take.answer.done():
            take.answer.set_exception(error)


class RateLimiter:
    def __init__(
        self, settings: Settings, redis: SharedRedis | None = None, metrics: Metrics | None = None
    ) -> None:
        self._default_key = Limit(settings.rate_limit_key_rate, settings.rate_limit_key_burst)
        self._tenant = Limit(settings.rate_limit_tenant_rate, settings.rate_limit_tenant_burst)
        self._tenants = dict(map(tenant_limit, settings.rate_limit_tenants))
        self._redis_takes = CoalescedTakes(redis) if redis is not None else None
        self._redis = redis
        self._local = LocalBuckets()
        self._metrics = metrics

    def tenant_limit(self, tenant: str) -> Limit:
        return self._tenants.get(tenant, self._tenant)

    def key_limit(self, key: ApiKey) -> Limit:
        if key.rate is not None and key.burst is not None:
            return Limit(key.rate, key.burst)
        return self._default_key

    async def check(self, key: ApiKey) -> Decision:
        """Take a token from the key's and the tenant's bucket, or from neither."""
        key_limit, tenant_limit = self.key_limit(key), self.tenant_limit(key.tenant)
        # Cluster: both in the tenant's slot (one script call may touch only one).
        tag = self._redis.hash_tag(key.tenant) if self._redis is not None else ""
        key_bucket, tenant_bucket = f"mlgate:rl:k:{tag}{key.key_id}", f"mlgate:rl:t:{tag}{key.tenant}"
        if self._redis_takes is not None:
            args = (key_limit.rate, key_limit.burst, tenant_limit.rate, tenant_limit.burst)
            try:
                allowed, key_left, tenant_left = await self._redis_takes.take(
                    (key_bucket, tenant_bucket), args
                )
                return self._counted(
                    Decision(allowed, key_limit, key_left, tenant_limit, tenant_left)
                )
            except RedisUnavailable:
                if self._metrics is not None:
                    self._metrics.rate_limit_fallback.inc()
        allowed_here, key_tokens, tenant_tokens = self._local.take(
            key.tenant,
            key_bucket, key_limit, tenant_bucket, tenant_limit
        )
        return self._counted(Decision(allowed_here, key_limit, key_tokens, tenant_limit, tenant_tokens))

    async def close(self) -> None:
        """Wait for the Redis call in flight, if any (before the client closes)."""
        if self._redis_takes is not None:
            await self._redis_takes.close()

    def _counted(self, decision: Decision) -> Decision:
        if not decision.allowed and self._metrics is not None:
            self._metrics.rate_limited.labels(decision.refused_by).inc()
        return decision
