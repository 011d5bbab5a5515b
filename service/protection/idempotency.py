"""Idempotency records: the first response to an Idempotency-Key, kept to be replayed.

``service.protection.middleware`` applies them to requests.

Semantics follow Stripe and draft-ietf-httpapi-idempotency-key-header:

- A POST with ``Idempotency-Key`` (1-255 printable ASCII characters) claims the key
  for its tenant, with a fingerprint: sha256 of method, path and query, and the
  (decompressed) body. The body is read up front for this, so such a request's body
  is bounded by ``MLGATE_MAX_BODY_BYTES`` even on the streaming endpoint.
- When the handler answers 2xx or 4xx (but not 429), status, body and a few headers
  (``Content-Type``, ``Location``, ``Link``, ``Deprecation``, ``Sunset``,
  ``Inference-Header-Content-Length``) are stored
  for ``MLGATE_IDEMPOTENCY_TTL_S`` (default 86400 s = 24 h). A 5xx, a 429 or an
  exception releases the key instead, so a retry runs the request again.
- A repeat with the same fingerprint gets the stored answer with
  ``Idempotent-Replayed: true`` and the handler does not run; a different
  fingerprint under the same key is 422; a repeat while the first is still running is
  409 with ``Retry-After``. While the request runs, its claim is extended every third
  of ``MLGATE_IDEMPOTENCY_LOCK_S`` however long it takes; it lapses after that lock only
  should its process die (or Redis fail throughout).

Once a request holds its claim it runs to the end in a task of its own, even if the
client disconnects and aiohttp cancels the handler: its answer is stored, so the
client's retry gets it instead of running the write a second time.

Keys live in Redis with ``REDIS_URL`` (one Lua script to claim, one to store or
release), at most ``MLGATE_IDEMPOTENCY_REDIS_TENANT_MAX_BYTES`` of answers per tenant
(its oldest out first); else in a bounded in-process map (``MLGATE_IDEMPOTENCY_MAX_ENTRIES``
and ``MLGATE_IDEMPOTENCY_MAX_BYTES`` in all, oldest out first, each tenant's flood
evicting only its own entries once it holds its fair share:
``service.protection.fair_share``). An answer larger than the budget is not kept: its
key is released, and a repeat runs again. On a Redis Cluster a tenant's records
share the hash tag ``{tenant}`` (one slot, on one master: the claims extended together
are grouped per tenant slot, one call each). While Redis fails, claims fall back to the in-process store: retries that
reach the same process are still safe; the record-id dedup (``service.ingest.dedup``)
is the second line behind it.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import msgspec
import structlog

from mlgate.config import Settings
from mlgate.service.protection.fair_share import FairShareMap
from mlgate.service.protection.shared_redis import RedisUnavailable, SharedRedis

T = TypeVar("T")
HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
KEPT_HEADERS = (
    "Content-Type",
    "Location",
    "Link",
    "Deprecation",
    "Sunset",
    "Inference-Header-Content-Length",  # OIP binary tensor answers
)

log = structlog.get_logger("mlgate.idempotency")

# KEYS: the record. ARGV: the in-flight entry, its lifetime in ms.
# Returns the existing entry, or nil after storing ours.
CLAIM_LUA = """
local current = redis.call('GET', KEYS[1])
if current then return current end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""
# KEYS: the record, the tenant's index of kept answers (a sorted set of
# "<bytes>:<record>" by the server time they were kept, ms), the tenant's kept bytes.
# ARGV: our in-flight entry, the final entry ('' to release), ttl ms, the tenant's budget.
# Returns 0 (the claim was no longer ours), 1 (done), 2 (too large for the budget: released).
# Answers past the budget push out the tenant's oldest; those that expired on their own
# leave the index as it is next written (their scores are older than the ttl).
FINISH_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local size, ttl, budget = #ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if size == 0 or size > budget then
  redis.call('DEL', KEYS[1])
  if size == 0 then return 1 end
  return 2
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local kept = tonumber(redis.call('GET', KEYS[3]) or '0')
local function forget(member)
  local sep = string.find(member, ':', 1, true)
  kept = kept - tonumber(string.sub(member, 1, sep - 1))
  return string.sub(member, sep + 1)
end
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl)) do
  forget(member)
  redis.call('ZREM', KEYS[2], member)
end
while kept + size > budget do
  local oldest = redis.call('ZPOPMIN', KEYS[2])
  if #oldest == 0 then kept = 0 break end
  redis.call('DEL', forget(oldest[1]))
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
redis.call('ZADD', KEYS[2], now, size .. ':' .. KEYS[1])
redis.call('SET', KEYS[3], kept + size, 'PX', ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
"""
# KEYS: records in flight. ARGV: our in-flight entry for each, then the lifetime in ms.
# Extends the claims still ours; a finished or lapsed one is left alone.
EXTEND_LUA = """
local lock_ms = ARGV[#ARGV]
for i, record in ipairs(KEYS) do
  if redis.call('GET', record) == ARGV[i] then redis.call('PEXPIRE', record, lock_ms) end
end
return 1
"""
MAX_EXTENDS_PER_CALL = 256


class StoredResponse(msgspec.Struct, frozen=True, array_like=True):
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class Entry(msgspec.Struct, frozen=True, array_like=True):
    fingerprint: str
    owner: str  # a random token per claim, so only its claimant finishes it
    response: StoredResponse | None = None  # None while in flight


_encode = msgspec.msgpack.Encoder().encode
_decode_entry = msgspec.msgpack.Decoder(Entry).decode


@dataclass(frozen=True, slots=True)
class Claim:
    record: str
    in_flight: bytes
    backend: Literal["redis", "local"]
    tenant: str


class LocalEntries:
    """The in-process store: per tenant, insertion-ordered entries with deadlines, at
    most ``max_entries`` and ``max_bytes`` of entries in all, both shared fairly: one
    tenant's flood of keys, or of large answers, evicts its own entries, never another
    tenant's replayable answers (``FairShareMap`` for the count; by bytes here, the same
    rule: the inserting tenant's oldest once it holds its share, else the largest's)."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self._entries: FairShareMap[tuple[float, bytes]] = FairShareMap(
            max_entries, on_evict=self._evicted
        )
        self._max_bytes = max_bytes
        self._bytes: dict[str, int] = {}  # per tenant, of the entries it holds
        self._total_bytes = 0

    @property
    def total_bytes(self) -> int:
        return self._total_bytes

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    def claim(self, tenant: str, record: str, in_flight: bytes, lock_s: float) -> bytes | None:
        now = time.monotonic()
        current = self._entries.get(tenant, record)
        if current is not None and current[0] > now:
            return current[1]
        self._put(tenant, record, (now + lock_s, in_flight))
        return None

    def extend(self, tenant: str, record: str, in_flight: bytes, lock_s: float) -> None:
        """Push back the lapse of a claim still ours."""
        current = self._entries.get(tenant, record)
        if current is not None and current[1] == in_flight:
            self._put(tenant, record, (time.monotonic() + lock_s, in_flight))

    def finish(
        self, tenant: str, record: str, in_flight: bytes, final: bytes | None, ttl_s: float
    ) -> bool:
        """Store ``final`` (None: release the claim); False if it was not kept: the
        claim was no longer ours, or the answer alone is larger than the whole store."""
        current = self._entries.get(tenant, record)
        if current is None or current[1] != in_flight:
            return False
        if final is None or len(final) > self._max_bytes:
            self._pop(tenant, record)
            return False
        self._put(tenant, record, (time.monotonic() + ttl_s, final))
        return True

    def _put(self, tenant: str, record: str, entry: tuple[float, bytes]) -> None:
        self._pop(tenant, record)
        self._entries.put(tenant, record, entry)
        self._count(tenant, len(entry[1]))
        while self._total_bytes > self._max_bytes:
            self._evict_bytes_for(tenant, record)

    def _pop(self, tenant: str, record: str) -> None:
        entry = self._entries.pop(tenant, record)
        if entry is not None:
            self._count(tenant, -len(entry[1]))

    def _evicted(self, tenant: str, record: str, entry: tuple[float, bytes]) -> None:
        self._count(tenant, -len(entry[1]))

    def _count(self, tenant: str, delta: int) -> None:
        held = self._bytes.get(tenant, 0) + delta
        if held:
            self._bytes[tenant] = held
        else:
            del self._bytes[tenant]
        self._total_bytes += delta

    def _evict_bytes_for(self, tenant: str, new_record: str) -> None:
        share = self._max_bytes // len(self._bytes)
        victim = tenant
        oldest = self._entries.oldest(tenant)
        # The newest entry is never the one evicted: it fits alone (finish keeps no
        # larger answer), so while over budget another entry is there to go.
        if self._bytes.get(tenant, 0) < max(1, share) or oldest is None or oldest[0] == new_record:
            others = [name for name in self._bytes if name != tenant]
            victim = max(others, key=self._bytes.__getitem__)
            oldest = self._entries.oldest(victim)
        assert oldest is not None
        self._pop(victim, oldest[0])


class IdempotencyStore:
    def __init__(self, settings: Settings, redis: SharedRedis | None = None) -> None:
        self._ttl_s = settings.idempotency_ttl_s
        self._lock_s = settings.idempotency_lock_s
        self._redis = redis
        self._claim = redis.script(CLAIM_LUA) if redis is not None else None
        self._finish = redis.script(FINISH_LUA) if redis is not None else None
        self._extend = redis.script(EXTEND_LUA) if redis is not None else None
        self._redis_tenant_max_bytes = settings.idempotency_redis_tenant_max_bytes
        self._local = LocalEntries(settings.idempotency_max_entries, settings.idempotency_max_bytes)
        self._running: set[asyncio.Task[Any]] = set()
        # Claims whose requests still run, by record, with the task that claimed; the
        # refresher extends them every third of the lock while that task lives (a claim
        # its task left unfinished lapses as before), and runs only while there are some.
        self._held: dict[str, tuple[Claim, asyncio.Task[Any] | None]] = {}
        self._refresher: asyncio.Task[None] | None = None

    async def run_to_completion(self, work: Coroutine[Any, Any, T]) -> T:
        """``await work`` in a task of its own that finishes even if the caller is cancelled."""
        task = asyncio.ensure_future(work)
        self._running.add(task)
        task.add_done_callback(self._forget)
        return await asyncio.shield(task)

    async def drain(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) for requests that outlived their handlers; the
        claims of any still running are left to lapse."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout_s)
        refresher, self._refresher = self._refresher, None
        if refresher is not None:
            refresher.cancel()
            await asyncio.gather(refresher, return_exceptions=True)

    def _hold(self, claim: Claim) -> None:
        self._held[claim.record] = (claim, asyncio.current_task())
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_held())

    async def _refresh_held(self) -> None:
        """Keep extending the claims whose requests still run: a request slower than
        ``idempotency_lock_s`` keeps its claim, so a retry meanwhile is 409, never a
        second run. Exits once none is held (the next claim starts it again)."""
        try:
            while self._held:
                await asyncio.sleep(self._lock_s / 3)
                try:
                    await self._extend_claims(self._still_running())
                except Exception as exc:  # a claim not extended still lapses, as before
                    log.error("idempotency_extend_failed", error=repr(exc))
        finally:
            if self._refresher is asyncio.current_task():
                self._refresher = None

    def _still_running(self) -> list[Claim]:
        for record, (_, task) in list(self._held.items()):
            if task is not None and task.done():
                del self._held[record]
        return [claim for claim, _ in self._held.values()]

    async def _extend_claims(self, claims: list[Claim]) -> None:
        shared = []
        for claim in claims:
            if claim.backend == "local" or self._redis is None:
                self._local.extend(claim.tenant, claim.record, claim.in_flight, self._lock_s)
            else:
                shared.append(claim)
        if self._redis is None or self._extend is None:
            return
        lock_ms = self._lock_s * 1000
        for group in self._redis.by_slot(shared, lambda claim: claim.record):
            for start in range(0, len(group), MAX_EXTENDS_PER_CALL):
                part = group[start : start + MAX_EXTENDS_PER_CALL]
                try:
                    await self._redis.call("idempotency", self._extend_call(part, lock_ms))
                except RedisUnavailable:
                    log.warning("idempotency_extend_failed", claims=len(part))

    def _extend_call(self, claims: list[Claim], lock_ms: int) -> Callable[[], Awaitable[Any]]:
        script = self._extend
        assert script is not None
        keys = [claim.record for claim in claims]
        args: list[bytes | int] = [claim.in_flight for claim in claims]
        args.append(lock_ms)
        return lambda: script(keys=keys, args=args)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: nobody may be left to await it

    def record_name(self, tenant: str, key: str) -> str:
        """The record's key name: ``mlgate:idem:<tenant>:<sha256 of key>``; on a Redis
        Cluster ``mlgate:idem:{<tenant>}:<sha256>``, every record of a tenant in one slot."""
        return self._tenant_prefix(tenant) + hashlib.sha256(key.encode()).hexdigest()

    def _tenant_prefix(self, tenant: str) -> str:
        tag = self._redis.hash_tag(tenant) if self._redis is not None else ""
        return f"mlgate:idem:{tag or tenant + ':'}"

    async def claim(self, tenant: str, key: str, fingerprint: str) -> Claim | Entry:
        """Our claim on ``key``, or the entry someone already holds under it."""
        record = self.record_name(tenant, key)
        in_flight = _encode(Entry(fingerprint=fingerprint, owner=secrets.token_hex(8)))
        if self._redis is not None and self._claim is not None:
            script, lock_ms = self._claim, self._lock_s * 1000
            try:
                existing = await self._redis.call(
                    "idempotency", lambda: script(keys=[record], args=[in_flight, lock_ms])
                )
            except RedisUnavailable:
                pass
            else:
                if existing is None:
                    return self._held_claim(Claim(record, in_flight, "redis", tenant))
                return _decode_entry(existing)
        existing = self._local.claim(tenant, record, in_flight, self._lock_s)
        if existing is None:
            return self._held_claim(Claim(record, in_flight, "local", tenant))
        return _decode_entry(existing)

    def _held_claim(self, claim: Claim) -> Claim:
        self._hold(claim)
        return claim

    async def complete(self, claim: Claim, response: StoredResponse) -> None:
        entry = _decode_entry(claim.in_flight)
        final = _encode(Entry(fingerprint=entry.fingerprint, owner="", response=response))
        await self._finish_claim(claim, final)

    async def release(self, claim: Claim) -> None:
        await self._finish_claim(claim, None)

    async def _finish_claim(self, claim: Claim, final: bytes | None) -> None:
        held = self._held.get(claim.record)
        if held is not None and held[0] is claim:
            del self._held[claim.record]
        if claim.backend == "local" or self._redis is None or self._finish is None:
            kept = self._local.finish(claim.tenant, claim.record, claim.in_flight, final, self._ttl_s)
            if final is not None and not kept and len(final) > self._local.max_bytes:
                self._not_kept(claim, final)
            return
        script, ttl_ms = self._finish, self._ttl_s * 1000
        prefix = self._tenant_prefix(claim.tenant)
        keys = [claim.record, prefix + "~kept", prefix + "~bytes"]
        args: list[bytes | int] = [claim.in_flight, final or b"", ttl_ms, self._redis_tenant_max_bytes]
        try:
            outcome = await self._redis.call("idempotency", lambda: script(keys=keys, args=args))
        except RedisUnavailable:
            # The claim lapses after idempotency_lock_s; until then repeats get 409.
            log.warning("idempotency_finish_failed", stored=final is not None)
            return
        if outcome == 2 and final is not None:
            self._not_kept(claim, final)

    @staticmethod
    def _not_kept(claim: Claim, final: bytes) -> None:
        # Larger than the tenant's whole budget: released, so a repeat runs again (record
        # dedup still keeps its records from being written twice within its window).
        log.warning("idempotency_answer_too_large_to_keep", tenant=claim.tenant, bytes=len(final))


def fingerprint(method: str, path_qs: str, body: bytes) -> str:
    digest = hashlib.sha256()
    digest.update(f"{method} {path_qs}\n".encode())
    digest.update(body)
    return digest.hexdigest()


def stores(status: int) -> bool:
    """Which answers are final: 2xx and 4xx but 409 and 429; those two (something else
    still in flight, over a limit) and 5xx are worth a retry with the same key."""
    return 200 <= status < 300 or (400 <= status < 500 and status not in (409, 429))
